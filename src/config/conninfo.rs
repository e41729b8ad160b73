//! libpq's TLS keys in a connection string. tokio-postgres parses the rest
//! of `source.url` but knows only `sslmode=disable|prefer|require` and
//! refuses `sslrootcert`, `sslcert` and `sslkey`, so they are taken out
//! here (from a URL's query or a key=value string, as libpq reads them),
//! and `[source]` keys of the same names are folded back in. Pure: no I/O.

use std::path::PathBuf;
use std::str::FromStr;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

/// libpq's `sslmode`, without `allow` (plain first, TLS on refusal), which
/// neither of the two clients pgfanout uses can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    /// libpq's default: TLS when the server offers it, plain otherwise.
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConninfoError;

    fn from_str(s: &str) -> Result<SslMode, ConninfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err(ConninfoError::Allow),
            other => return Err(ConninfoError::SslMode(other.to_string())),
        })
    }
}

/// The TLS keys as written (nothing resolved yet: a missing `sslmode` is
/// not `prefer` here, since `sslrootcert=system` changes the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsKeys {
    pub sslmode: Option<SslMode>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

impl TlsKeys {
    /// `self`, with each key `over` sets replacing ours.
    pub fn overridden_by(&self, over: &TlsKeys) -> TlsKeys {
        TlsKeys {
            sslmode: over.sslmode.or(self.sslmode),
            sslrootcert: over.sslrootcert.clone().or_else(|| self.sslrootcert.clone()),
            sslcert: over.sslcert.clone().or_else(|| self.sslcert.clone()),
            sslkey: over.sslkey.clone().or_else(|| self.sslkey.clone()),
        }
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(m) = self.sslmode {
            out.push(("sslmode", m.as_str().to_string()));
        }
        if let Some(r) = &self.sslrootcert {
            out.push(("sslrootcert", r.clone()));
        }
        if let Some(c) = &self.sslcert {
            out.push(("sslcert", c.to_string_lossy().into_owned()));
        }
        if let Some(k) = &self.sslkey {
            out.push(("sslkey", k.to_string_lossy().into_owned()));
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConninfoError {
    #[error("sslmode={0} is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error("sslmode=allow (plain first, TLS if the server insists) is not supported: use prefer or require")]
    Allow,
    #[error("sslnegotiation=direct is not supported (the replication connection negotiates TLS the PostgreSQL way); remove it or use sslnegotiation=postgres")]
    DirectNegotiation,
    #[error("{key}: {why}")]
    Value { key: &'static str, why: &'static str },
    #[error("key=value connection string: {0}")]
    KeyValue(&'static str),
    // tokio-postgres's parse errors name the option, never its value.
    #[error(transparent)]
    Parse(#[from] tokio_postgres::Error),
}

/// A connection string split into what tokio-postgres parses and the TLS keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The string without its TLS keys, in the form it was written in.
    pub rest: String,
    form: Form,
    pub tls: TlsKeys,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Url,
    KeyValue,
}

/// Characters a URL query value carries as they are; `/` stays readable in paths.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

/// Splits `conninfo` (a `postgres://` / `postgresql://` URL or libpq's
/// key=value form) into the rest and its TLS keys.
pub fn split(conninfo: &str) -> Result<Split, ConninfoError> {
    let trimmed = conninfo.trim_start();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        split_url(conninfo)
    } else {
        split_key_value(conninfo)
    }
}

impl Split {
    /// The connection string again, with `tls` written into it.
    pub fn join(&self) -> String {
        let pairs = self.tls.pairs();
        let mut out = self.rest.clone();
        match self.form {
            Form::Url => {
                for (i, (k, v)) in pairs.iter().enumerate() {
                    let sep = if i == 0 && !out.contains('?') { '?' } else { '&' };
                    out.push(sep);
                    out.push_str(k);
                    out.push('=');
                    out.extend(utf8_percent_encode(v, QUERY_VALUE));
                }
            }
            Form::KeyValue => {
                for (k, v) in pairs {
                    if !out.is_empty() {
                        out.push(' ');
                    }
                    out.push_str(k);
                    out.push_str("='");
                    out.push_str(&v.replace('\\', "\\\\").replace('\'', "\\'"));
                    out.push('\'');
                }
            }
        }
        out
    }

    /// tokio-postgres's config of the rest; its `ssl_mode` is left to the
    /// caller, who knows whether TLS is used at all.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConninfoError> {
        let pg = tokio_postgres::Config::from_str(&self.rest)?;
        if pg.get_ssl_negotiation() == tokio_postgres::config::SslNegotiation::Direct {
            return Err(ConninfoError::DirectNegotiation);
        }
        Ok(pg)
    }
}

/// `conninfo` with the keys `over` sets replacing its own: how `[source]`'s
/// `sslmode`, `sslrootcert`, `sslcert` and `sslkey` reach every connection.
pub fn with_tls_keys(conninfo: &str, over: &TlsKeys) -> Result<String, ConninfoError> {
    if *over == TlsKeys::default() {
        return Ok(conninfo.to_string());
    }
    let mut s = split(conninfo)?;
    s.tls = s.tls.overridden_by(over);
    Ok(s.join())
}

/// Takes `key` into `tls` when it is a TLS key (false when it is not). A
/// key given again replaces the earlier value, as in libpq.
fn take(tls: &mut TlsKeys, key: &str, value: String) -> Result<bool, ConninfoError> {
    let path = |key: &'static str, v: String| match v.is_empty() {
        true => Err(ConninfoError::Value { key, why: "empty path" }),
        false => Ok(v),
    };
    match key {
        "sslmode" => tls.sslmode = Some(value.parse()?),
        "sslrootcert" => tls.sslrootcert = Some(path("sslrootcert", value)?),
        "sslcert" => tls.sslcert = Some(path("sslcert", value)?.into()),
        "sslkey" => tls.sslkey = Some(path("sslkey", value)?.into()),
        _ => return Ok(false),
    }
    Ok(true)
}

fn split_url(url: &str) -> Result<Split, ConninfoError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut tls = TlsKeys::default();
    let mut kept = Vec::new();
    for param in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (k, v) = param.split_once('=').unwrap_or((param, ""));
        let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
        if !take(&mut tls, k, v)? {
            kept.push(param);
        }
    }
    let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok(Split { rest, form: Form::Url, tls })
}

/// libpq's key=value syntax: `key = value` pairs separated by white space;
/// a value is single-quoted to hold spaces (or be empty), and `\` escapes
/// the next character, quoted or not.
fn split_key_value(s: &str) -> Result<Split, ConninfoError> {
    let mut tls = TlsKeys::default();
    let mut kept: Vec<&str> = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &s[start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == b.len() || b[i] != b'=' {
            return Err(ConninfoError::KeyValue("a key without `=` and a value"));
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(ConninfoError::KeyValue("an unterminated quoted value")),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        // Cut at ASCII delimiters only, so the value's UTF-8 is whole.
        if !take(&mut tls, key, String::from_utf8_lossy(&value).into_owned())? {
            kept.push(&s[start..i]);
        }
    }
    Ok(Split { rest: kept.join(" "), form: Form::KeyValue, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_keys_are_taken_out_and_the_rest_kept_as_written() {
        let s = split(
            "postgres://u:p%3Fw@db.example.com:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20bundle.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(s.rest, "postgres://u:p%3Fw@db.example.com:5432/app?application_name=x&connect_timeout=5");
        assert_eq!(s.tls.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(s.tls.sslrootcert.as_deref(), Some("/etc/ca bundle.pem"));
        assert_eq!(s.tls.sslcert, None);
        let pg = s.pg_config().unwrap();
        assert_eq!(pg.get_dbname(), Some("app"));
        assert_eq!(pg.get_password(), Some(&b"p?w"[..]));
    }

    #[test]
    fn url_without_tls_keys_is_unchanged() {
        let url = "postgresql://u@localhost/db?options=-c%20x%3Dy";
        let s = split(url).unwrap();
        assert_eq!(s.rest, url);
        assert_eq!(s.tls, TlsKeys::default());
        assert_eq!(s.join(), url);
        assert_eq!(split("postgres://u@h/db?sslmode=require").unwrap().rest, "postgres://u@h/db");
    }

    #[test]
    fn key_value_keys_are_taken_out_with_quotes_and_escapes() {
        let s = split(
            "host=db port = 5433 sslcert='/certs/my client.crt' password='it\\'s' sslkey=/certs/c\\ k.key sslmode = verify-ca",
        )
        .unwrap();
        assert_eq!(s.rest, "host=db port = 5433 password='it\\'s'");
        assert_eq!(s.tls.sslcert, Some(PathBuf::from("/certs/my client.crt")));
        assert_eq!(s.tls.sslkey, Some(PathBuf::from("/certs/c k.key")));
        assert_eq!(s.tls.sslmode, Some(SslMode::VerifyCa));
        // As in libpq, a key given again wins.
        assert_eq!(split("host=h sslmode=disable sslmode=require").unwrap().tls.sslmode, Some(SslMode::Require));
        let pg = s.pg_config().unwrap();
        assert_eq!(pg.get_password(), Some(&b"it's"[..]));
        assert_eq!(pg.get_ports(), &[5433]);
    }

    #[test]
    fn joined_keys_read_back_the_same() {
        let tls = TlsKeys {
            sslmode: Some(SslMode::VerifyFull),
            sslrootcert: Some("/a b/it's&ca=1.pem".into()),
            sslcert: Some("/c/client.crt".into()),
            sslkey: Some("/c/client.key".into()),
        };
        for base in ["postgres://u@h/db", "postgres://u@h/db?application_name=p", "host=h dbname=db", ""] {
            let joined = with_tls_keys(base, &tls).unwrap();
            let back = split(&joined).unwrap();
            assert_eq!(back.tls, tls, "{joined}");
            assert_eq!(back.rest, base, "{joined}");
        }
    }

    #[test]
    fn source_keys_override_the_url() {
        let over = TlsKeys { sslmode: Some(SslMode::VerifyFull), ..Default::default() };
        let url = with_tls_keys("postgres://u@h/db?sslmode=disable&sslrootcert=/ca.pem", &over).unwrap();
        let s = split(&url).unwrap();
        assert_eq!(s.tls.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(s.tls.sslrootcert.as_deref(), Some("/ca.pem"));
        // Nothing to fold: the string is left exactly as it was.
        let plain = "postgres://u@h/db?sslmode=disable";
        assert_eq!(with_tls_keys(plain, &TlsKeys::default()).unwrap(), plain);
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let err = |s: &str| split(s).unwrap_err().to_string();
        assert!(err("postgres://h/db?sslmode=verify").contains("sslmode=verify is not one of"));
        assert!(err("host=h sslmode=allow").contains("sslmode=allow"));
        assert!(err("host=h sslcert=''").contains("sslcert: empty path"));
        assert!(err("host=h sslkey='/x").contains("unterminated"));
        assert!(err("host=h sslkey").contains("without `=`"));
        let direct = split("postgres://h/db?sslnegotiation=direct&sslmode=require").unwrap();
        assert!(matches!(direct.pg_config(), Err(ConninfoError::DirectNegotiation)));
    }
}
