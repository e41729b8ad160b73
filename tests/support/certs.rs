//! A certificate authority of the test's own, made with Debian's `openssl`,
//! and the server and client certificates it signs (EC P-256, valid two
//! days), for services started with TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    dir: tempfile::TempDir,
    name: String,
    /// The CA certificate (PEM): what a client's `ca_file` names.
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its private key (PEM files).
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str], files: &[&Path]) {
    let mut c = Command::new("openssl");
    c.args(args);
    let out = c.output().unwrap_or_else(|e| panic!("openssl (Debian's openssl package): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in files {
        assert!(f.exists(), "openssl {args:?} wrote no {}", f.display());
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl TestCa {
    /// A self-signed CA called `name` in a fresh temporary directory.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new().prefix("pgfanout-ca-").tempdir().expect("temp dir for the CA");
        let (cert, key) = (dir.path().join(format!("{name}-ca.pem")), dir.path().join(format!("{name}-ca.key")));
        let subject = format!("/CN=pgfanout {name} test CA");
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2", "-subj", &subject];
        args.extend(EC);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        args.extend(["-keyout", s(&key), "-out", s(&cert)]);
        openssl(&args, &[&cert, &key]);
        TestCa { dir, name: name.into(), cert, key }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self) -> Issued {
        self.issue("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    }

    /// A client certificate for `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(&format!("client-{cn}"), cn, "extendedKeyUsage=clientAuth\n")
    }

    fn issue(&self, what: &str, cn: &str, extensions: &str) -> Issued {
        let file = |ext: &str| self.dir.path().join(format!("{}-{what}.{ext}", self.name));
        let (cert, key, csr, extfile) = (file("pem"), file("key"), file("csr"), file("ext"));
        std::fs::write(
            &extfile,
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{extensions}"),
        )
        .expect("write the extensions file");
        let subject = format!("/CN={cn}");
        let mut args = vec!["req", "-nodes", "-subj", &subject];
        args.extend(EC);
        args.extend(["-keyout", s(&key), "-out", s(&csr)]);
        openssl(&args, &[&key, &csr]);
        let serial = format!("{}", rand::random::<u32>());
        openssl(
            &["x509", "-req", "-in", s(&csr), "-CA", s(&self.cert), "-CAkey", s(&self.key), "-set_serial", &serial]
                .into_iter()
                .chain(["-days", "2", "-extfile", s(&extfile), "-out", s(&cert)])
                .collect::<Vec<_>>(),
            &[&cert],
        );
        Issued { cert, key }
    }
}
