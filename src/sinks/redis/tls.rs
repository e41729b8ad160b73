//! The Redis client for `redis.url`: with TLS for `rediss://`, through the
//! crate's own rustls support, trusting `redis.ca_file` (else the system's
//! roots) and presenting `redis.client_cert_file` / `client_key_file` to a
//! server that asks for a client certificate. Verification is always on:
//! the crate's `#insecure` URL fragment is refused (its feature is off).

use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates};

use crate::config::RedisConfig;
use crate::sinks::tls::{read_certificates, read_file};
use crate::sinks::SinkError;

fn tls_error(detail: String) -> SinkError {
    SinkError::Tls { sink: "redis", detail }
}

/// The client `cfg` describes; a TLS key set for a URL without TLS, a file
/// that cannot be read, or only one of the client certificate and its key,
/// is an error here, at start.
pub fn client(cfg: &RedisConfig) -> Result<redis::Client, SinkError> {
    let url = cfg.url.expose();
    let info = url.into_connection_info()?;
    let tls_keys = [
        ("ca_file", &cfg.ca_file),
        ("client_cert_file", &cfg.client_cert_file),
        ("client_key_file", &cfg.client_key_file),
    ];
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        if let Some((key, _)) = tls_keys.iter().find(|(_, v)| v.is_some()) {
            return Err(tls_error(format!("redis.{key} is set but redis.url is not a rediss:// URL (TLS)")));
        }
        return Ok(redis::Client::open(info)?);
    }
    install_default_provider();
    let root_cert = match &cfg.ca_file {
        Some(path) => {
            read_certificates("redis", "redis.ca_file", path)?;
            Some(read_file("redis", "redis.ca_file", path)?)
        }
        None => None,
    };
    let client_tls = match (&cfg.client_cert_file, &cfg.client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            read_certificates("redis", "redis.client_cert_file", cert)?;
            let client_key = read_file("redis", "redis.client_key_file", key)?;
            if let Err(e) =
                <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_slice(&client_key)
            {
                // The error names the PEM problem, never the key's bytes.
                return Err(tls_error(format!(
                    "redis.client_key_file = {}: not a PEM private key ({e})",
                    key.display()
                )));
            }
            Some(ClientTlsConfig { client_cert: read_file("redis", "redis.client_cert_file", cert)?, client_key })
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(tls_error(
                "redis.client_cert_file and redis.client_key_file go together: set both or neither".into(),
            ));
        }
    };
    Ok(redis::Client::build_with_tls(info, TlsCertificates { client_tls, root_cert })?)
}

/// Makes ring rustls's process-wide provider, for clients that build their
/// TLS configuration with it (the redis crate): the tree enables both ring
/// and aws-lc-rs, so rustls cannot pick one itself and would panic. ring is
/// the one reqwest and pgwire-replication use; a provider installed
/// earlier (by either) stays.
fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn err(cfg: &RedisConfig) -> String {
        client(cfg).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn certificate_keys_need_a_tls_url_and_each_other() {
        let mut cfg = RedisConfig::new(Secret("redis://127.0.0.1:6379".into()));
        assert!(client(&cfg).is_ok());
        cfg.client_key_file = Some("/nonexistent/key.pem".into());
        assert_eq!(err(&cfg), "redis: redis.client_key_file is set but redis.url is not a rediss:// URL (TLS)");
        cfg.url = Secret("rediss://127.0.0.1:6380".into());
        assert_eq!(
            err(&cfg),
            "redis: redis.client_cert_file and redis.client_key_file go together: set both or neither"
        );
        cfg.client_key_file = None;
        cfg.ca_file = Some("/nonexistent/ca.pem".into());
        let e = err(&cfg);
        assert!(e.starts_with("redis: redis.ca_file = /nonexistent/ca.pem: ") && e.contains("No such file"), "{e}");
        cfg.ca_file = None;
        assert!(client(&cfg).is_ok(), "rediss:// alone trusts the system's roots");
    }

    #[test]
    fn a_bad_key_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        // Any well-formed certificate PEM will do to get as far as the key.
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw=\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let mut cfg = RedisConfig::new(Secret("rediss://127.0.0.1:6380".into()));
        (cfg.client_cert_file, cfg.client_key_file) = (Some(cert), Some(key));
        let e = err(&cfg);
        assert!(e.contains("redis.client_key_file") && e.contains("not a PEM private key"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "the key's bytes leaked into the error: {e}");
    }
}
