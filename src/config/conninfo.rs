//! libpq's TLS keys in a connection string, and the servers it names.
//! tokio-postgres parses the rest of `source.url` but knows only
//! `sslmode=disable|prefer|require` and refuses `sslrootcert`, `sslcert`
//! and `sslkey`, so they are taken out here (from a URL's query or a
//! key=value string, as libpq reads them), and `[source]` keys of the same
//! names are folded back in. A multi-host string (`host=h1,h2 port=p1,p2`,
//! `postgres://h1:p1,h2:p2/db`) is cut into its servers ([`endpoints`]),
//! so that pgfanout can choose the primary among them and open every
//! connection, the replication one too, to that one server. Pure: no I/O.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::{Host, TargetSessionAttrs};

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
    #[error("the connection string names no host (give host or hostaddr)")]
    NoHost,
    #[error("the connection string names {hosts} hosts but {other}: give one per host")]
    HostCounts { hosts: usize, other: String },
    #[error("target_session_attrs=read-only asks for a standby, but pgfanout reads its slot and writes its state on the primary: use read-write, or leave it out (pgfanout always picks the primary among the hosts)")]
    ReadOnlyTarget,
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
        if pg.get_target_session_attrs() == TargetSessionAttrs::ReadOnly {
            return Err(ConninfoError::ReadOnlyTarget);
        }
        Ok(pg)
    }
}

/// One server of a connection string, with the port and `hostaddr` that
/// go with it (libpq pairs the lists by position; one port serves all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host`: a name or address over TCP, or a Unix socket directory;
    /// None when only `hostaddr` is given.
    pub host: Option<Host>,
    /// libpq's `hostaddr`: the address to connect to, while the
    /// certificate is checked against `host`.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl Endpoint {
    pub fn is_tcp(&self) -> bool {
        self.hostaddr.is_some() || matches!(self.host, Some(Host::Tcp(_)))
    }

    /// The name the server's certificate must hold: the host's, else the
    /// address (or the socket directory, where TLS is not used).
    pub fn name(&self) -> String {
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(h)), _) => h.clone(),
            (Some(Host::Unix(p)), _) => p.display().to_string(),
            (None, Some(addr)) => addr.to_string(),
            (None, None) => String::new(),
        }
    }

    /// Where to connect: `hostaddr` when given, else the host.
    pub fn dial(&self) -> String {
        self.hostaddr.map_or_else(|| self.name(), |a| a.to_string())
    }

    /// `pg` (every setting of it) connecting to this server alone.
    pub fn config(&self, pg: &tokio_postgres::Config) -> tokio_postgres::Config {
        let mut one = tokio_postgres::Config::new();
        if let Some(user) = pg.get_user() {
            one.user(user);
        }
        if let Some(password) = pg.get_password() {
            one.password(password);
        }
        if let Some(dbname) = pg.get_dbname() {
            one.dbname(dbname);
        }
        if let Some(options) = pg.get_options() {
            one.options(options);
        }
        if let Some(name) = pg.get_application_name() {
            one.application_name(name);
        }
        if let Some(t) = pg.get_connect_timeout() {
            one.connect_timeout(*t);
        }
        if let Some(t) = pg.get_tcp_user_timeout() {
            one.tcp_user_timeout(*t);
        }
        if let Some(i) = pg.get_keepalives_interval() {
            one.keepalives_interval(i);
        }
        if let Some(r) = pg.get_keepalives_retries() {
            one.keepalives_retries(r);
        }
        one.ssl_mode(pg.get_ssl_mode())
            .ssl_negotiation(pg.get_ssl_negotiation())
            .keepalives(pg.get_keepalives())
            .keepalives_idle(pg.get_keepalives_idle())
            .target_session_attrs(pg.get_target_session_attrs())
            .channel_binding(pg.get_channel_binding())
            .load_balance_hosts(pg.get_load_balance_hosts())
            .port(self.port);
        match &self.host {
            Some(Host::Tcp(h)) => {
                one.host(h);
            }
            Some(Host::Unix(p)) => {
                one.host_path(p);
            }
            None => {}
        }
        if let Some(addr) = self.hostaddr {
            one.hostaddr(addr);
        }
        one
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name(), self.port)
    }
}

/// The servers `pg` names, in the order libpq tries them: one per host (or
/// per `hostaddr` when no host is given), each with its port (a single
/// port serves every host; none is 5432). Counts that do not pair up are
/// refused, as libpq refuses them.
pub fn endpoints(pg: &tokio_postgres::Config) -> Result<Vec<Endpoint>, ConninfoError> {
    let (hosts, addrs, ports) = (pg.get_hosts(), pg.get_hostaddrs(), pg.get_ports());
    let n = hosts.len().max(addrs.len());
    if n == 0 {
        return Err(ConninfoError::NoHost);
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(ConninfoError::HostCounts { hosts: hosts.len(), other: format!("{} hostaddrs", addrs.len()) });
    }
    if ports.len() > 1 && ports.len() != n {
        return Err(ConninfoError::HostCounts { hosts: n, other: format!("{} ports", ports.len()) });
    }
    Ok((0..n)
        .map(|i| Endpoint {
            host: hosts.get(i).cloned(),
            hostaddr: addrs.get(i).copied(),
            port: ports.get(i).or(ports.first()).copied().unwrap_or(5432),
        })
        .collect())
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

    fn servers(conninfo: &str) -> Vec<String> {
        let pg = split(conninfo).unwrap().pg_config().unwrap();
        endpoints(&pg).unwrap().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn multi_host_strings_name_each_server_with_its_port() {
        assert_eq!(
            servers("postgresql://u@h1:5433,h2:5434/db?target_session_attrs=read-write"),
            ["h1:5433", "h2:5434"]
        );
        assert_eq!(servers("host=h1,h2 port=5433,5434 dbname=db"), ["h1:5433", "h2:5434"]);
        // One port for every host; none is 5432.
        assert_eq!(servers("host=h1,h2,h3 port=6000"), ["h1:6000", "h2:6000", "h3:6000"]);
        assert_eq!(servers("postgres://u@h1,h2/db"), ["h1:5432", "h2:5432"]);
        // hostaddr: the name stays the host's (what the certificate must hold).
        let pg = split("host=a.example,b.example hostaddr=10.0.0.1,10.0.0.2 port=1,2").unwrap().pg_config().unwrap();
        let e = endpoints(&pg).unwrap();
        assert_eq!(
            (e[1].name(), e[1].dial(), e[1].port, e[1].is_tcp()),
            ("b.example".into(), "10.0.0.2".into(), 2, true)
        );
        let only_addr = endpoints(&split("hostaddr=10.0.0.9").unwrap().pg_config().unwrap()).unwrap();
        assert_eq!((only_addr[0].name(), only_addr[0].host.clone()), ("10.0.0.9".into(), None));
        let unix = endpoints(&split("host=/run/pg port=5433").unwrap().pg_config().unwrap()).unwrap();
        assert!(!unix[0].is_tcp());
    }

    #[test]
    fn counts_that_do_not_pair_up_are_refused() {
        let err = |s: &str| endpoints(&split(s).unwrap().pg_config().unwrap()).unwrap_err().to_string();
        assert!(err("host=h1,h2,h3 port=1,2").contains("3 hosts but 2 ports"), "{}", err("host=h1,h2,h3 port=1,2"));
        assert!(err("host=h1,h2 hostaddr=10.0.0.1").contains("2 hosts but 1 hostaddrs"));
        assert!(matches!(endpoints(&tokio_postgres::Config::new()), Err(ConninfoError::NoHost)));
        let ro = split("host=h1,h2 target_session_attrs=read-only").unwrap().pg_config();
        assert!(matches!(ro, Err(ConninfoError::ReadOnlyTarget)));
    }

    #[test]
    fn a_server_s_config_is_the_string_with_that_host_alone() {
        let multi = split(
            "postgresql://u:pw@h1:5433,h2:5434/db?target_session_attrs=read-write&connect_timeout=3&application_name=a&options=-c%20x%3D1&keepalives_idle=30",
        )
        .unwrap()
        .pg_config()
        .unwrap();
        let second = &endpoints(&multi).unwrap()[1];
        let alone = split(
            "postgresql://u:pw@h2:5434/db?target_session_attrs=read-write&connect_timeout=3&application_name=a&options=-c%20x%3D1&keepalives_idle=30",
        )
        .unwrap()
        .pg_config()
        .unwrap();
        assert_eq!(second.config(&multi), alone);
        let kv = split("host=a,b hostaddr=10.0.0.1,10.0.0.2 port=1,2 user=u").unwrap().pg_config().unwrap();
        let want = split("host=b hostaddr=10.0.0.2 port=2 user=u").unwrap().pg_config().unwrap();
        assert_eq!(endpoints(&kv).unwrap()[1].config(&kv), want);
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
