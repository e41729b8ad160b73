//! The ClickHouse client for `clickhouse.url`. `http://` gets the crate's
//! default client, as before. `https://` gets a hyper client of our own
//! with a rustls connector, handed to the crate through
//! `Client::with_http_client`: the crate's TLS features trust only a fixed
//! root set (webpki or the system's) and take no CA of one's own, which a
//! server with a private CA needs. The server's certificate is verified
//! against `clickhouse.ca_file` if set, else the system's trusted roots
//! (Debian's ca-certificates in the image).

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::ClickHouseConfig;
use crate::sinks::tls::read_certificates;
use crate::sinks::SinkError;

/// As the crate's default client: TCP keepalive, and idle connections
/// dropped before ClickHouse's own 3 s `keep_alive_timeout` closes them
/// (a request sent on a connection the server is closing fails).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

fn tls_error(detail: String) -> SinkError {
    SinkError::Tls { sink: "clickhouse", detail }
}

pub fn is_https(url: &str) -> bool {
    url.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// The client `cfg` describes (URL, user, password; no database). A CA for
/// an `http://` URL, or a CA file that cannot be read, is an error here.
pub fn client(cfg: &ClickHouseConfig) -> Result<Client, SinkError> {
    let client = if is_https(&cfg.url) {
        https_client(cfg)?
    } else if cfg.ca_file.is_some() {
        return Err(tls_error("clickhouse.ca_file is set but clickhouse.url is not an https:// URL".into()));
    } else {
        Client::default()
    };
    Ok(client.with_url(&cfg.url).with_user(&cfg.user).with_password(cfg.password.expose()))
}

fn https_client(cfg: &ClickHouseConfig) -> Result<Client, SinkError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            for cert in read_certificates("clickhouse", "clickhouse.ca_file", path)? {
                roots.add(cert).map_err(|e| tls_error(format!("clickhouse.ca_file = {}: {e}", path.display())))?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as
            // rustls-native-certs leaves it to the caller; none at all is an error.
            let system = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(system.certs);
            if roots.is_empty() {
                return Err(tls_error(
                    "no trusted CA certificates on this system for an https:// URL: install ca-certificates or set clickhouse.ca_file".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(TCP_KEEPALIVE));
    // The HTTPS connector below hands it https:// URIs.
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(connector);
    // The request body type is the crate's own and not exported: the one
    // client type `with_http_client` accepts fixes it.
    Ok(Client::with_http_client(hyper))
}

/// The TLS error under a failed request, as text ("invalid peer
/// certificate: UnknownIssuer"), when the handshake is what failed: the
/// crate reports only "network error: client error (Connect)". hyper-rustls
/// wraps the rustls error in two `io::Error`s, and an `io::Error`'s
/// `source` skips the error it wraps, so the walk steps into each one's.
pub fn handshake_failure(e: &clickhouse::error::Error) -> Option<String> {
    let e: &(dyn Error + 'static) = e;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        next = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn Error + 'static)),
            None => err.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_needs_an_https_url() {
        let mut cfg = ClickHouseConfig {
            url: "http://127.0.0.1:8123".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            database: "app".into(),
            user: "default".into(),
            password: Default::default(),
            on_permanent_error: Default::default(),
            permanent_attempts: 3,
        };
        let err = |cfg: &ClickHouseConfig| client(cfg).map(|_| ()).unwrap_err().to_string();
        assert_eq!(err(&cfg), "clickhouse: clickhouse.ca_file is set but clickhouse.url is not an https:// URL");
        cfg.url = "HTTPS://127.0.0.1:8443".into();
        let e = err(&cfg);
        assert!(e.starts_with("clickhouse: clickhouse.ca_file = /nonexistent/ca.pem: "), "{e}");
        cfg.ca_file = None;
        assert!(client(&cfg).is_ok(), "https:// alone trusts the system's roots (ca-certificates is installed)");
    }

    #[test]
    fn the_handshake_error_is_found_under_io_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As hyper-rustls reports it: an I/O error in an I/O error.
        let io = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let e = clickhouse::error::Error::Network(Box::new(io));
        assert_eq!(handshake_failure(&e).as_deref(), Some("invalid peer certificate: UnknownIssuer"));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(handshake_failure(&clickhouse::error::Error::Network(Box::new(refused))), None);
    }
}
