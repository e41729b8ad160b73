//! TLS to PostgreSQL, one policy for the SQL connections (tokio-postgres)
//! and the replication connection (pgwire-replication): libpq's `sslmode`
//! rules resolved into what to ask the server and what to verify, a rustls
//! client configuration per connection whose verifier remembers why it
//! refused a certificate, and errors that say which connection failed and
//! why. Certificates and keys are read from their files at each connection
//! (a rotated certificate is used from the next one); their contents never
//! reach a log or an error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::conninfo::{SslMode, TlsKeys};

/// Which of pgfanout's two kinds of PostgreSQL connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Catalog reads, the journal, snapshots, heartbeats (tokio-postgres).
    Sql,
    /// The walsender session the changes stream on (pgwire-replication).
    Replication,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Sql => "SQL connection",
            Link::Replication => "replication connection",
        })
    }
}

/// What the TLS settings ask for that cannot be had: a missing file, an
/// unreadable key, libpq's own refusals.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("sslmode={mode} verifies the server's certificate, but no sslrootcert is given and {} does not exist: set sslrootcert to the file of the CA that signed the server's certificate (or to `system` for the system's trusted roots)", default.display())]
    NoRootCert { mode: SslMode, default: PathBuf },
    #[error("sslrootcert=system needs sslmode=verify-full, not {0} (as in libpq)")]
    WeakModeWithSystemRoots(SslMode),
    #[error("sslrootcert {}: {why}", path.display())]
    RootCert { path: PathBuf, why: String },
    #[error("sslcert {}: {why}", path.display())]
    Cert { path: PathBuf, why: String },
    #[error("sslkey {}: {why} (an unencrypted PEM key is needed: PKCS#8, PKCS#1 or SEC1)", path.display())]
    Key { path: PathBuf, why: String },
    #[error("the TLS configuration cannot be built: {0}")]
    Rustls(#[source] rustls::Error),
}

/// Why a TLS handshake failed, in the terms an operator acts on.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("the server's certificate is not signed by a CA in {roots} (unknown CA)")]
    UnknownCa { roots: String },
    #[error("the server's certificate is not valid for the host name {expected} (it names {presented}): connect with a name it holds, or use sslmode=verify-ca")]
    NameMismatch { expected: String, presented: String },
    #[error("the server's certificate has expired")]
    Expired,
    #[error("the server's certificate is not valid yet (check the clocks)")]
    NotYetValid,
    #[error("the server's certificate was refused: {0}")]
    BadCertificate(rustls::Error),
    #[error("the server does not accept TLS connections (its `ssl` setting is off); use sslmode=prefer or disable, or turn ssl on there")]
    ServerWithoutTls,
    #[error("the server refused the client certificate ({alert}): check sslcert and sslkey, and that the server's ssl_ca_file holds the CA that signed it")]
    ClientCertRefused { alert: String },
    #[error("{0}")]
    Other(rustls::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{link} to {target} failed the TLS handshake (sslmode={mode}): {failure}")]
    Handshake { link: Link, target: String, mode: SslMode, failure: HandshakeFailure },
    #[error("{link} to {target} without TLS (sslmode=disable) was refused by the server: {server}; if its pg_hba.conf accepts only TLS connections (hostssl lines), set sslmode=verify-full (or require)")]
    PlainRefused { link: Link, target: String, server: String },
    #[error("{link}: TLS settings: {source}")]
    Config { link: Link, source: TlsConfigError },
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    File(PathBuf),
    /// `sslrootcert=system`: Mozilla's list of trusted roots (the webpki-roots
    /// crate), so a container without a CA bundle verifies public CAs too.
    System,
}

impl std::fmt::Display for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Roots::File(p) => write!(f, "sslrootcert {}", p.display()),
            Roots::System => f.write_str("the system's trusted roots (sslrootcert=system)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypt only (prefer and require without a root certificate).
    Nothing,
    /// verify-ca: signed by a trusted CA, whatever name it holds.
    Chain,
    /// verify-full: also issued for the host name connected to.
    ChainAndName,
}

/// What the server is asked for, as both clients know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    Plain,
    /// TLS if the server offers it, plain if it answers that it has none.
    Prefer,
    Require,
}

/// libpq's TLS rules applied to the keys of one connection string.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    mode: SslMode,
    verify: Verify,
    roots: Option<Roots>,
    identity: Option<(PathBuf, PathBuf)>,
}

impl TlsPolicy {
    /// Resolves `keys` the way libpq does: `prefer` by default
    /// (`verify-full` with `sslrootcert=system`); the CA file defaults to
    /// `~/.postgresql/root.crt` when that exists, and `prefer`/`require`
    /// with a CA file verify the chain (libpq's compatibility rule); the
    /// client certificate and key default to `~/.postgresql/postgresql.crt`
    /// and `.key` when the certificate exists. Over a Unix socket TLS is
    /// not used, whatever `sslmode` says (libpq ignores it there too).
    pub fn resolve(keys: &TlsKeys, over_tcp: bool) -> Result<TlsPolicy, TlsConfigError> {
        let pgdir = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
        Self::resolve_with(keys, over_tcp, pgdir)
    }

    /// `resolve` with libpq's per-user directory given (`~/.postgresql`).
    fn resolve_with(keys: &TlsKeys, over_tcp: bool, pgdir: Option<PathBuf>) -> Result<TlsPolicy, TlsConfigError> {
        let plain = TlsPolicy { mode: SslMode::Disable, verify: Verify::Nothing, roots: None, identity: None };
        if !over_tcp {
            return Ok(plain);
        }
        let in_pgdir = |name: &str| pgdir.clone().unwrap_or_else(|| PathBuf::from("~/.postgresql")).join(name);
        let default_file = |name: &str| pgdir.as_ref().map(|d| d.join(name)).filter(|p| p.exists());
        let roots = match keys.sslrootcert.as_deref() {
            Some("system") => Some(Roots::System),
            Some(path) => Some(Roots::File(path.into())),
            None => default_file("root.crt").map(Roots::File),
        };
        let mode = match (keys.sslmode, &roots) {
            (None, Some(Roots::System)) => SslMode::VerifyFull,
            (Some(m), Some(Roots::System)) if m != SslMode::VerifyFull => {
                return Err(TlsConfigError::WeakModeWithSystemRoots(m));
            }
            (m, _) => m.unwrap_or_default(),
        };
        let verify = match mode {
            SslMode::Disable => return Ok(plain),
            SslMode::Prefer | SslMode::Require if roots.is_some() => Verify::Chain,
            SslMode::Prefer | SslMode::Require => Verify::Nothing,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::VerifyFull => Verify::ChainAndName,
        };
        if verify != Verify::Nothing && roots.is_none() {
            return Err(TlsConfigError::NoRootCert { mode, default: in_pgdir("root.crt") });
        }
        let identity = keys
            .sslcert
            .clone()
            .or_else(|| default_file("postgresql.crt"))
            .map(|cert| (cert, keys.sslkey.clone().unwrap_or_else(|| in_pgdir("postgresql.key"))));
        Ok(TlsPolicy { mode, verify, roots, identity })
    }

    pub fn negotiation(&self) -> Negotiation {
        match self.mode {
            SslMode::Disable => Negotiation::Plain,
            SslMode::Prefer => Negotiation::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Negotiation::Require,
        }
    }

    /// A rustls configuration for one connection (loading the files now),
    /// and the verdict its verifier leaves when it refuses the server's
    /// certificate. With `Negotiation::Plain` it is never used.
    pub fn client_config(&self) -> Result<(rustls::ClientConfig, Verdict), TlsConfigError> {
        // Chosen explicitly: rustls is built with both ring and aws-lc-rs
        // here (through reqwest), and pgwire-replication uses ring.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verdict = Verdict::default();
        let inner = match (&self.roots, self.verify) {
            (_, Verify::Nothing) | (None, _) => None,
            (Some(roots), _) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(load_roots(roots)?), provider.clone())
                    .build()
                    .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?,
            ),
        };
        let verifier = Arc::new(RecordingVerifier {
            inner,
            check_name: self.verify == Verify::ChainAndName,
            provider: provider.clone(),
            verdict: verdict.clone(),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| TlsConfigError::Key { path: key.clone(), why: e.to_string() })?,
        };
        Ok((config, verdict))
    }

    fn roots_text(&self) -> String {
        self.roots.as_ref().map_or_else(|| "no root certificate".to_string(), |r| r.to_string())
    }
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::File(path) => {
            let why = |why: String| TlsConfigError::RootCert { path: path.clone(), why };
            let certs = read_certs(path).map_err(why)?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(why("holds no usable CA certificate".into()));
            }
        }
    }
    Ok(store)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    read_certs(path).map_err(|why| TlsConfigError::Cert { path: path.to_path_buf(), why })
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    // The PEM errors name the file's problem (missing, no key section,
    // bad base64), never its bytes.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsConfigError::Key { path: path.to_path_buf(), why: e.to_string() })
}

/// Why the verifier refused the server's certificate, if it did: rustls'
/// handshake error reaches tokio-postgres as an I/O error and
/// pgwire-replication as text, while this keeps the typed reason.
#[derive(Debug, Clone, Default)]
pub struct Verdict(Arc<Mutex<Option<rustls::Error>>>);

impl Verdict {
    fn record(&self, e: &rustls::Error) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
    }

    fn rejection(&self) -> Option<rustls::Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// rustls' WebPKI verifier for the chain (and the name, with verify-full),
/// accepting any certificate when nothing is verified; handshake
/// signatures are checked in every mode, so the peer holds the key of the
/// certificate it shows.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
    verdict: Verdict,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else { return Ok(ServerCertVerified::assertion()) };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => Ok(v),
            // The WebPKI verifier checks the name last, after the chain:
            // a name error means the chain was good, which is all
            // verify-ca asks.
            Err(e) if !self.check_name && is_name_error(&e) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                self.verdict.record(&e);
                Err(e)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn is_name_error(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// The rustls error inside `e`, if a TLS failure is what it carries.
/// tokio-postgres and pgwire-replication wrap it in an `io::Error`, whose
/// `source()` skips the error it holds, so each level is unwrapped by hand.
pub fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

/// What a failed connection left to go on, gathered by each client's caller.
#[derive(Debug, Default)]
pub struct Evidence<'a> {
    /// A rustls error the client's error carries (an alert from the server).
    pub rustls: Option<&'a rustls::Error>,
    /// The server's message when it refused the login itself (SQLSTATE 28000).
    pub login_refused: Option<String>,
    /// The failure came from TLS negotiation without a typed cause (the
    /// server may have answered the SSLRequest with "no").
    pub negotiation_failed: bool,
}

/// One connection's TLS, kept beside the client to explain its failure.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub link: Link,
    pub policy: TlsPolicy,
    verdict: Verdict,
    /// As shown in errors: `host:port`, each host of a multi-host string.
    pub target: String,
    /// The host name the certificate is checked against.
    host: String,
    /// Where to ask again whether the server speaks TLS at all.
    probe: Option<(String, u16)>,
}

impl Attempt {
    /// One connection's TLS and its rustls configuration (not used when
    /// the connection is plain).
    pub fn new(
        link: Link,
        policy: TlsPolicy,
        target: String,
        host: String,
        probe: Option<(String, u16)>,
    ) -> Result<(Attempt, rustls::ClientConfig), TlsError> {
        let (config, verdict) = policy.client_config().map_err(|source| TlsError::Config { link, source })?;
        Ok((Attempt { link, policy, verdict, target, host, probe }, config))
    }

    /// The TLS error behind a failed connection, or None when TLS is not
    /// what failed (the caller keeps its own error then).
    pub async fn explain(&self, evidence: Evidence<'_>) -> Option<TlsError> {
        let handshake = |failure| TlsError::Handshake {
            link: self.link,
            target: self.target.clone(),
            mode: self.policy.mode,
            failure,
        };
        if let Some(rejected) = self.verdict.rejection() {
            return Some(handshake(self.certificate_failure(rejected)));
        }
        if let Some(e) = evidence.rustls {
            return Some(handshake(match e {
                rustls::Error::AlertReceived(alert)
                    if self.policy.identity.is_some() && is_certificate_alert(*alert) =>
                {
                    HandshakeFailure::ClientCertRefused { alert: format!("{alert:?}") }
                }
                other => self.certificate_failure(other.clone()),
            }));
        }
        if let Some(server) = evidence.login_refused {
            if self.policy.negotiation() == Negotiation::Plain {
                return Some(TlsError::PlainRefused { link: self.link, target: self.target.clone(), server });
            }
            return None;
        }
        if evidence.negotiation_failed && self.policy.negotiation() == Negotiation::Require {
            if let Some((host, port)) = &self.probe {
                if refuses_tls(host, *port).await {
                    return Some(handshake(HandshakeFailure::ServerWithoutTls));
                }
            }
        }
        None
    }

    fn certificate_failure(&self, e: rustls::Error) -> HandshakeFailure {
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa { roots: self.policy.roots_text() },
                CertificateError::NotValidForNameContext { presented, .. } => HandshakeFailure::NameMismatch {
                    expected: self.host.clone(),
                    presented: presented.iter().map(|n| tidy_name(n)).collect::<Vec<_>>().join(", "),
                },
                CertificateError::NotValidForName => {
                    HandshakeFailure::NameMismatch { expected: self.host.clone(), presented: "other names".into() }
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => HandshakeFailure::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    HandshakeFailure::NotYetValid
                }
                other => HandshakeFailure::BadCertificate(rustls::Error::InvalidCertificate(other)),
            },
            other => HandshakeFailure::Other(other),
        }
    }
}

/// `DnsName("db.example.com")` (how WebPKI lists a certificate's names) as `db.example.com`.
fn tidy_name(presented: &str) -> &str {
    ["DnsName(\"", "IpAddress("]
        .iter()
        .find_map(|p| presented.strip_prefix(p))
        .map_or(presented, |rest| rest.trim_end_matches(')').trim_end_matches('"'))
}

fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::DecryptError
    )
}

/// Asks the server whether it speaks TLS (an SSLRequest on a connection of
/// its own): true when it answers "N". Only after a failure that neither
/// client says more about.
async fn refuses_tls(host: &str, port: u16) -> bool {
    const PATIENCE: Duration = Duration::from_secs(5);
    // Length 8, then the SSLRequest code 80877103.
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let ask = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await?;
        s.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer[0] == b'N')
    };
    matches!(tokio::time::timeout(PATIENCE, ask).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(keys: &TlsKeys, over_tcp: bool) -> Result<TlsPolicy, TlsConfigError> {
        // No ~/.postgresql: its files must not get in the way of the rules.
        TlsPolicy::resolve_with(keys, over_tcp, None)
    }

    fn keys(mode: Option<SslMode>, root: Option<&str>) -> TlsKeys {
        TlsKeys { sslmode: mode, sslrootcert: root.map(str::to_string), ..Default::default() }
    }

    #[test]
    fn libpq_defaults_and_rules() {
        let p = resolve(&keys(None, None), true).unwrap();
        assert_eq!((p.mode, p.verify, p.negotiation()), (SslMode::Prefer, Verify::Nothing, Negotiation::Prefer));
        let p = resolve(&keys(Some(SslMode::Require), Some("/ca.pem")), true).unwrap();
        assert_eq!(p.verify, Verify::Chain, "require with a root certificate is verify-ca");
        let p = resolve(&keys(None, Some("system")), true).unwrap();
        assert_eq!((p.mode, p.verify), (SslMode::VerifyFull, Verify::ChainAndName));
        assert!(matches!(
            resolve(&keys(Some(SslMode::Require), Some("system")), true),
            Err(TlsConfigError::WeakModeWithSystemRoots(SslMode::Require))
        ));
        let err = resolve(&keys(Some(SslMode::VerifyFull), None), true).unwrap_err().to_string();
        assert!(err.contains("no sslrootcert is given"), "{err}");
        let p = resolve(&keys(Some(SslMode::VerifyFull), None), false).unwrap();
        assert_eq!(p.negotiation(), Negotiation::Plain, "no TLS over a Unix socket");
        let p = resolve(
            &TlsKeys { sslmode: Some(SslMode::Disable), sslcert: Some("/c.crt".into()), ..Default::default() },
            true,
        )
        .unwrap();
        assert_eq!((p.negotiation(), p.identity), (Negotiation::Plain, None));
    }

    #[test]
    fn client_key_defaults_to_libpq_s_and_errors_name_files_only() {
        let p = TlsPolicy::resolve_with(
            &TlsKeys {
                sslmode: Some(SslMode::Require),
                sslcert: Some("/nowhere/client.crt".into()),
                ..Default::default()
            },
            true,
            Some("/home/u/.postgresql".into()),
        )
        .unwrap();
        assert_eq!(p.identity.as_ref().unwrap().1, PathBuf::from("/home/u/.postgresql/postgresql.key"));
        let err = p.client_config().unwrap_err().to_string();
        assert!(err.starts_with("sslcert /nowhere/client.crt: "), "{err}");
    }

    #[test]
    fn names_are_tidied() {
        assert_eq!(tidy_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(tidy_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(tidy_name("something else"), "something else");
    }
}
