//! What the Redis and ClickHouse sinks share for TLS: reading the PEM files
//! their sections name, with errors that name the key.

use std::path::Path;

use super::SinkError;

/// The bytes of the file `key` names, or an error naming the sink, the key
/// and the path (never the content: a key file is a secret).
pub fn read_file(sink: &'static str, key: &str, path: &Path) -> Result<Vec<u8>, SinkError> {
    std::fs::read(path).map_err(|e| SinkError::Tls { sink, detail: format!("{key} = {}: {e}", path.display()) })
}

/// The parsed certificates of the PEM file `key` names; an error when it
/// holds none (a key file or a DER file given by mistake).
pub fn read_certificates(
    sink: &'static str,
    key: &str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, SinkError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| SinkError::Tls { sink, detail: format!("{key} = {}: {why}", path.display()) };
    let pem = read_file(sink, key, path)?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = read_certificates("redis", "redis.ca_file", &path).unwrap_err().to_string();
        assert!(e.starts_with("redis: redis.ca_file = ") && e.ends_with("holds no PEM certificate"), "{e}");
        let e = read_certificates("redis", "redis.ca_file", &dir.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("redis.ca_file") && e.contains("No such file"), "{e}");
    }
}
