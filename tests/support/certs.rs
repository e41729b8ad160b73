//! A certificate authority of the test's own, made with Debian's openssl,
//! and the server and client certificates it signs (EC P-256, valid for a
//! week), for services started with TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    dir: PathBuf,
    name: String,
}

/// A certificate and its (unencrypted, PKCS#8) key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

impl TestCa {
    /// A new CA in `dir` (files `<name>.crt`, `<name>.key`), its subject `cn`.
    pub fn new(dir: &Path, name: &str, cn: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("create certificate dir");
        let cnf = format!(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {cn}\n[ca]\n\
             basicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier = hash\n"
        );
        std::fs::write(dir.join(format!("{name}.cnf")), cnf).unwrap();
        let (crt, key, cnf) = (format!("{name}.crt"), format!("{name}.key"), format!("{name}.cnf"));
        let mut args = vec!["req", "-x509", "-new", "-config", &cnf, "-extensions", "ca", "-nodes", "-days", "7"];
        args.extend(EC_KEY);
        args.extend(["-keyout", &key, "-out", &crt]);
        openssl(dir, &args);
        TestCa { dir: dir.to_path_buf(), name: name.to_string() }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    /// A server certificate for `names` (subjectAltName entries such as
    /// `DNS:localhost`), named `<file>.crt` / `<file>.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> Issued {
        self.issue(file, "pgfanout test server", "serverAuth", Some(&names.join(",")))
    }

    /// A client certificate whose subject CN is `user` (what PostgreSQL's
    /// `cert` authentication matches the user name with).
    pub fn client(&self, file: &str, user: &str) -> Issued {
        self.issue(file, user, "clientAuth", None)
    }

    fn issue(&self, file: &str, cn: &str, usage: &str, san: Option<&str>) -> Issued {
        let (crt, key, csr, ext) =
            (format!("{file}.crt"), format!("{file}.key"), format!("{file}.csr"), format!("{file}.ext"));
        let mut ext_text = format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = {usage}\nauthorityKeyIdentifier = keyid\n"
        );
        if let Some(san) = san {
            ext_text.push_str(&format!("subjectAltName = {san}\n"));
        }
        std::fs::write(self.dir.join(&ext), ext_text).unwrap();
        let subj = format!("/CN={cn}");
        let mut args = vec!["req", "-new", "-nodes", "-subj", &subj];
        args.extend(EC_KEY);
        args.extend(["-keyout", &key, "-out", &csr]);
        openssl(&self.dir, &args);
        let (ca_crt, ca_key) = (format!("{}.crt", self.name), format!("{}.key", self.name));
        let serial = format!("0x{}", uuid::Uuid::new_v4().simple());
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-set_serial",
                &serial,
                "-days",
                "7",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
        Issued { cert: self.dir.join(crt), key: self.dir.join(key) }
    }
}
