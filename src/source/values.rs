//! Typed column values from the cells pgoutput sends: PostgreSQL's text output
//! format (the default) or its binary send format (`binary = true`).
//!
//! Pure and total: unknown type OIDs become [`Value::Unknown`] instead of
//! errors, and malformed input is a [`ValueError`], never a panic. Text parsing
//! assumes the server defaults a replication session runs with: `DateStyle =
//! ISO`, `IntervalStyle = postgres`, `bytea_output = hex` (escape is accepted
//! too). Enums travel as their label ([`Value::Unknown`] with the enum's OID);
//! resolve a domain to its base type's OID before calling.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value as Json;
use uuid::Uuid;

/// Days between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_DAYS: i64 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// PostgreSQL's MAXDIM.
const MAX_ARRAY_DIMS: usize = 6;

/// Type OIDs this module understands (`pg_type.oid`, stable across versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const CIDR: u32 = 650;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const INET: u32 = 869;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;

    /// Whether `Value::from_binary` decodes `oid` (a built-in scalar this
    /// module knows, or an array of one) into what its text form gives.
    pub fn decodes_binary(oid: u32) -> bool {
        matches!(
            oid,
            BOOL | BYTEA
                | NAME
                | INT8
                | INT2
                | INT4
                | TEXT
                | JSON
                | CIDR
                | FLOAT4
                | FLOAT8
                | INET
                | BPCHAR
                | VARCHAR
                | DATE
                | TIME
                | TIMESTAMP
                | TIMESTAMPTZ
                | INTERVAL
                | TIMETZ
                | NUMERIC
                | UUID
                | JSONB
        ) || array_element(oid).is_some()
    }

    /// The element type of a known array type.
    pub fn array_element(array_oid: u32) -> Option<u32> {
        Some(match array_oid {
            1000 => BOOL,
            1001 => BYTEA,
            1003 => NAME,
            1005 => INT2,
            1007 => INT4,
            1016 => INT8,
            1009 => TEXT,
            1015 => VARCHAR,
            1014 => BPCHAR,
            1021 => FLOAT4,
            1022 => FLOAT8,
            1231 => NUMERIC,
            2951 => UUID,
            1182 => DATE,
            1183 => TIME,
            1115 => TIMESTAMP,
            1185 => TIMESTAMPTZ,
            1187 => INTERVAL,
            1270 => TIMETZ,
            3807 => JSONB,
            199 => JSON,
            1041 => INET,
            651 => CIDR,
            _ => return None,
        })
    }
}

/// One dimension of an array: its length and lower bound (1 unless the
/// array was built with explicit bounds like `'[0:2]={a,b,c}'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayDim {
    pub len: usize,
    pub lower_bound: i32,
}

/// A typed column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    /// Exact decimal in PostgreSQL's canonical text (`-12.340`, `NaN`,
    /// `Infinity`, `-Infinity`); no float rounding, any precision.
    Numeric(String),
    /// text, varchar, bpchar (with its padding), name.
    Text(String),
    Uuid(Uuid),
    Date(NaiveDate),
    /// µs since midnight, `0..=86_400_000_000` (PostgreSQL allows `24:00:00`).
    Time(i64),
    /// µs since midnight and the zone's offset in seconds east of UTC.
    TimeTz {
        micros: i64,
        offset_secs: i32,
    },
    Timestamp(NaiveDateTime),
    TimestampTz(DateTime<Utc>),
    /// `infinity` / `-infinity` of a date, timestamp or timestamptz (`oid`).
    Infinity {
        oid: u32,
        negative: bool,
    },
    Interval {
        months: i32,
        days: i32,
        micros: i64,
    },
    /// json and jsonb: the value, and the text PostgreSQL sent (a json's
    /// input as it was typed, a jsonb's canonical form), which the log
    /// writes as Debezium does.
    Json {
        value: Json,
        text: Box<str>,
    },
    Bytea(Vec<u8>),
    /// Canonical PostgreSQL text, e.g. `192.168.1.5/24`, `::1`.
    Inet(String),
    /// Canonical PostgreSQL text, e.g. `10.0.0.0/8`.
    Cidr(String),
    /// Elements flattened in row-major order; `dims` gives the shape
    /// (empty for an empty array).
    Array {
        elem_oid: u32,
        dims: Vec<ArrayDim>,
        values: Vec<Value>,
    },
    /// A type this module does not know (enums, extensions, ...), as its text
    /// output. For binary cells: the bytes as UTF-8 if they are, else `\x` hex.
    Unknown {
        oid: u32,
        text: String,
    },
}

/// A cell that is not a valid value of its declared type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot read {text:?} as type OID {oid}: {reason}")]
pub struct ValueError {
    pub oid: u32,
    /// The offending input (lossy UTF-8 for text, hex for binary), shortened.
    pub text: String,
    pub reason: String,
}

fn err_text(oid: u32, raw: &[u8], reason: impl Into<String>) -> ValueError {
    let mut text: String = String::from_utf8_lossy(raw).chars().take(80).collect();
    if raw.len() > text.len() {
        text.push('…');
    }
    ValueError { oid, text, reason: reason.into() }
}

fn err_bin(oid: u32, raw: &[u8], reason: impl Into<String>) -> ValueError {
    let mut text = format!("\\x{}", hex::encode(raw.get(..40).unwrap_or(raw)));
    if raw.len() > 40 {
        text.push('…');
    }
    ValueError { oid, text, reason: reason.into() }
}

impl Value {
    /// Parses PostgreSQL's text output of a value of type `type_oid`.
    pub fn from_text(type_oid: u32, text: &[u8]) -> Result<Value, ValueError> {
        if let Some(elem) = oid::array_element(type_oid) {
            return parse_text_array(type_oid, elem, text);
        }
        let Ok(s) = std::str::from_utf8(text) else {
            if is_known(type_oid) {
                return Err(err_text(type_oid, text, "invalid UTF-8"));
            }
            return Ok(Value::Unknown { oid: type_oid, text: String::from_utf8_lossy(text).into_owned() });
        };
        let e = |reason: &str| err_text(type_oid, text, reason);
        Ok(match type_oid {
            oid::BOOL => match s {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => return Err(e("expected t or f")),
            },
            oid::INT2 => Value::Int2(s.parse().map_err(|_| e("not an int2"))?),
            oid::INT4 => Value::Int4(s.parse().map_err(|_| e("not an int4"))?),
            oid::INT8 => Value::Int8(s.parse().map_err(|_| e("not an int8"))?),
            oid::FLOAT4 => Value::Float4(match parse_float(s) {
                Some(f) if f.is_finite() => s.parse().map_err(|_| e("not a float4"))?,
                Some(f) => f as f32,
                None => return Err(e("not a float4")),
            }),
            oid::FLOAT8 => Value::Float8(parse_float(s).ok_or_else(|| e("not a float8"))?),
            oid::NUMERIC => {
                if !is_numeric_text(s) {
                    return Err(e("not a numeric"));
                }
                Value::Numeric(s.to_owned())
            }
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME => Value::Text(s.to_owned()),
            oid::UUID => Value::Uuid(Uuid::parse_str(s).map_err(|_| e("not a uuid"))?),
            oid::JSON | oid::JSONB => Value::json(s).map_err(|x| e(&format!("invalid JSON: {x}")))?,
            oid::BYTEA => {
                Value::Bytea(parse_bytea_text(s).ok_or_else(|| e("invalid bytea (expected \\x hex or escape format)"))?)
            }
            oid::INET => Value::Inet(check_inet(s).ok_or_else(|| e("not an inet"))?),
            oid::CIDR => Value::Cidr(check_inet(s).ok_or_else(|| e("not a cidr"))?),
            oid::DATE => match s {
                "infinity" => Value::Infinity { oid: type_oid, negative: false },
                "-infinity" => Value::Infinity { oid: type_oid, negative: true },
                _ => Value::Date(parse_date(s).ok_or_else(|| e("not an ISO date"))?),
            },
            oid::TIME => Value::Time(parse_time(s).ok_or_else(|| e("not a time"))?),
            oid::TIMETZ => {
                let (micros, offset_secs) = parse_timetz(s).ok_or_else(|| e("not a time with time zone"))?;
                Value::TimeTz { micros, offset_secs }
            }
            oid::TIMESTAMP | oid::TIMESTAMPTZ => match s {
                "infinity" => Value::Infinity { oid: type_oid, negative: false },
                "-infinity" => Value::Infinity { oid: type_oid, negative: true },
                _ => {
                    let tz = type_oid == oid::TIMESTAMPTZ;
                    let (naive, offset) = parse_timestamp(s, tz).ok_or_else(|| e("not an ISO timestamp"))?;
                    if tz {
                        let utc = naive
                            .checked_sub_signed(Duration::seconds(offset.into()))
                            .ok_or_else(|| e("out of range"))?;
                        Value::TimestampTz(utc.and_utc())
                    } else {
                        Value::Timestamp(naive)
                    }
                }
            },
            oid::INTERVAL => {
                let (months, days, micros) =
                    parse_interval(s).ok_or_else(|| e("not an interval (IntervalStyle postgres)"))?;
                Value::Interval { months, days, micros }
            }
            _ => Value::Unknown { oid: type_oid, text: s.to_owned() },
        })
    }

    /// Parses PostgreSQL's binary send format of a value of type `type_oid`.
    pub fn from_binary(type_oid: u32, data: &[u8]) -> Result<Value, ValueError> {
        if let Some(elem) = oid::array_element(type_oid) {
            return parse_binary_array(type_oid, elem, data);
        }
        let e = |reason: &str| err_bin(type_oid, data, reason);
        let fixed = |n: usize| -> Result<&[u8], ValueError> {
            if data.len() == n {
                Ok(data)
            } else {
                Err(e(&format!("expected {n} bytes, got {}", data.len())))
            }
        };
        let utf8 = || std::str::from_utf8(data).map_err(|_| e("invalid UTF-8"));
        Ok(match type_oid {
            oid::BOOL => Value::Bool(fixed(1)?.first() != Some(&0)),
            oid::INT2 => Value::Int2(i16::from_be_bytes(arr(fixed(2)?))),
            oid::INT4 => Value::Int4(i32::from_be_bytes(arr(fixed(4)?))),
            oid::INT8 => Value::Int8(i64::from_be_bytes(arr(fixed(8)?))),
            oid::FLOAT4 => Value::Float4(f32::from_be_bytes(arr(fixed(4)?))),
            oid::FLOAT8 => Value::Float8(f64::from_be_bytes(arr(fixed(8)?))),
            oid::NUMERIC => Value::Numeric(numeric_binary_to_text(data).ok_or_else(|| e("malformed binary numeric"))?),
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME => Value::Text(utf8()?.to_owned()),
            oid::UUID => Value::Uuid(Uuid::from_bytes(arr(fixed(16)?))),
            oid::JSON => Value::json(utf8()?).map_err(|x| e(&format!("invalid JSON: {x}")))?,
            oid::JSONB => match data.split_first() {
                Some((1, rest)) => {
                    let text = std::str::from_utf8(rest).map_err(|_| e("invalid UTF-8"))?;
                    Value::json(text).map_err(|x| e(&format!("invalid JSON: {x}")))?
                }
                _ => return Err(e("unknown jsonb binary version")),
            },
            oid::BYTEA => Value::Bytea(data.to_vec()),
            oid::INET | oid::CIDR => {
                let (text, is_cidr) = inet_binary_to_text(data).ok_or_else(|| e("malformed binary inet"))?;
                if type_oid == oid::CIDR || is_cidr {
                    Value::Cidr(text)
                } else {
                    Value::Inet(text)
                }
            }
            oid::DATE => match i32::from_be_bytes(arr(fixed(4)?)) {
                i32::MAX => Value::Infinity { oid: type_oid, negative: false },
                i32::MIN => Value::Infinity { oid: type_oid, negative: true },
                days => Value::Date(date_from_pg_days(days).ok_or_else(|| e("date out of range"))?),
            },
            oid::TIME => {
                let micros = i64::from_be_bytes(arr(fixed(8)?));
                if !(0..=MICROS_PER_DAY).contains(&micros) {
                    return Err(e("time out of range"));
                }
                Value::Time(micros)
            }
            oid::TIMETZ => {
                let b = fixed(12)?;
                let micros = i64::from_be_bytes(arr(b.get(..8).unwrap_or_default()));
                // The wire carries seconds *west* of UTC.
                let west = i32::from_be_bytes(arr(b.get(8..).unwrap_or_default()));
                if !(0..=MICROS_PER_DAY).contains(&micros) || west.unsigned_abs() > 16 * 3600 {
                    return Err(e("timetz out of range"));
                }
                Value::TimeTz { micros, offset_secs: -west }
            }
            oid::TIMESTAMP | oid::TIMESTAMPTZ => match i64::from_be_bytes(arr(fixed(8)?)) {
                i64::MAX => Value::Infinity { oid: type_oid, negative: false },
                i64::MIN => Value::Infinity { oid: type_oid, negative: true },
                micros => {
                    let ts = micros
                        .checked_add(super::PG_EPOCH_OFFSET_US)
                        .and_then(DateTime::from_timestamp_micros)
                        .ok_or_else(|| e("timestamp out of range"))?;
                    if type_oid == oid::TIMESTAMPTZ {
                        Value::TimestampTz(ts)
                    } else {
                        Value::Timestamp(ts.naive_utc())
                    }
                }
            },
            oid::INTERVAL => {
                let b = fixed(16)?;
                Value::Interval {
                    micros: i64::from_be_bytes(arr(b.get(..8).unwrap_or_default())),
                    days: i32::from_be_bytes(arr(b.get(8..12).unwrap_or_default())),
                    months: i32::from_be_bytes(arr(b.get(12..).unwrap_or_default())),
                }
            }
            _ => Value::Unknown {
                oid: type_oid,
                text: match std::str::from_utf8(data) {
                    Ok(s) => s.to_owned(),
                    Err(_) => format!("\\x{}", hex::encode(data)),
                },
            },
        })
    }

    /// Debezium-style JSON:
    /// - timestamptz: ISO-8601 UTC with `Z` (`2026-11-28T06:30:00.123Z`);
    ///   timestamp (no zone): ISO-8601 without zone, since it is not UTC;
    ///   date `YYYY-MM-DD`; time `HH:MM:SS[.ffffff]`, timetz with `+HH:MM`;
    ///   infinities as `"infinity"` / `"-infinity"`;
    /// - interval: ISO-8601 duration (`P1Y2M3DT4H5M6.5S`);
    /// - numeric: string (exact); NaN/±Infinity floats: `"NaN"`, `"Infinity"`, `"-Infinity"`;
    /// - bytea: PostgreSQL hex text, `"\\x00ff"`;
    /// - uuid, inet, cidr, unknown types: string; json/jsonb: embedded JSON;
    /// - arrays: nested JSON arrays following the dimensions.
    ///
    /// (`Serialize for Value` writes that shape; this is it as a tree.)
    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }

    /// A json or jsonb value from its text.
    pub fn json(text: &str) -> Result<Value, serde_json::Error> {
        Ok(Value::Json { value: serde_json::from_str(text)?, text: text.into() })
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Integer types (int2, int4, int8).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int2(i) => Some((*i).into()),
            Value::Int4(i) => Some((*i).into()),
            Value::Int8(i) => Some(*i),
            _ => None,
        }
    }

    /// Any numeric type, rounded to the nearest f64 (numeric included).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float4(f) => Some((*f).into()),
            Value::Float8(f) => Some(*f),
            Value::Numeric(s) => parse_float(s),
            other => other.as_i64().map(|i| i as f64),
        }
    }

    /// Numeric (and integers) as an exact `rust_decimal::Decimal`; `None` for
    /// NaN, ±Infinity and values beyond its 28 significant digits.
    pub fn as_decimal(&self) -> Option<rust_decimal::Decimal> {
        match self {
            Value::Numeric(s) => s.parse().ok(),
            other => other.as_i64().map(rust_decimal::Decimal::from),
        }
    }

    /// Text-like values: text/varchar/bpchar/name, and unknown types such as
    /// enums (their label).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            Value::Unknown { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn as_uuid(&self) -> Option<Uuid> {
        match self {
            Value::Uuid(u) => Some(*u),
            _ => None,
        }
    }

    /// timestamptz / timestamp (taken as UTC) as ms since the Unix epoch,
    /// microseconds truncated (floored), as ClickHouse converts to
    /// DateTime64(3) (so a row never moves to the next day's partition);
    /// `None` for infinities and other types.
    pub fn as_timestamp_millis(&self) -> Option<i64> {
        match self {
            Value::TimestampTz(t) => Some(t.timestamp_millis()),
            Value::Timestamp(t) => Some(t.and_utc().timestamp_millis()),
            _ => None,
        }
    }
}

fn is_known(type_oid: u32) -> bool {
    matches!(
        type_oid,
        oid::BOOL
            | oid::BYTEA
            | oid::NAME
            | oid::INT8
            | oid::INT2
            | oid::INT4
            | oid::TEXT
            | oid::JSON
            | oid::CIDR
            | oid::FLOAT4
            | oid::FLOAT8
            | oid::INET
            | oid::BPCHAR
            | oid::VARCHAR
            | oid::DATE
            | oid::TIME
            | oid::TIMESTAMP
            | oid::TIMESTAMPTZ
            | oid::INTERVAL
            | oid::TIMETZ
            | oid::NUMERIC
            | oid::UUID
            | oid::JSONB
    )
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(src) = b.get(..N) {
        a.copy_from_slice(src);
    }
    a
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        // Rust also accepts "inf"/"nan"; PostgreSQL never prints those.
        _ if s.bytes().any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E') => None,
        _ => s.parse().ok(),
    }
}

/// `[-]digits[.digits][e[+-]digits]`, or NaN / ±Infinity.
fn is_numeric_text(s: &str) -> bool {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let b = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mant, exp) = match b.find(['e', 'E']) {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    let digits = |x: &str| x.bytes().all(|c| c.is_ascii_digit());
    let exp_ok = exp.map_or(true, |e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    !(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac) && exp_ok
}

fn numeric_binary_to_text(data: &[u8]) -> Option<String> {
    let h = |i: usize| data.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let ndigits = usize::from(h(0)?);
    let weight = i32::from(h(2)? as i16);
    let sign = h(4)?;
    let dscale = usize::from(h(6)?);
    if data.len() != 8 + 2 * ndigits {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    if dscale > 0x3FFF {
        return None;
    }
    let mut digits = Vec::with_capacity(ndigits);
    for i in 0..ndigits {
        let d = h(8 + 2 * i)?;
        if d > 9999 {
            return None;
        }
        digits.push(d);
    }
    let digit = |i: i32| -> u16 { usize::try_from(i).ok().and_then(|i| digits.get(i).copied()).unwrap_or(0) };
    let mut out = String::with_capacity(8 + 4 * (weight.max(0) as usize + 1) + dscale);
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                out.push_str(&digit(i).to_string());
            } else {
                out.push_str(&format!("{:04}", digit(i)));
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut frac = String::with_capacity(dscale + 4);
        let mut i = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(i)));
            i += 1;
        }
        frac.truncate(dscale);
        out.push_str(&frac);
    }
    Some(out)
}

fn parse_bytea_text(s: &str) -> Option<Vec<u8>> {
    if let Some(h) = s.strip_prefix("\\x") {
        return hex::decode(h).ok();
    }
    // Escape format: `\\` is a backslash, `\ooo` an octal byte.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'\\' {
            out.push(c);
            i += 1;
        } else if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|d| (b'0'..=b'7').contains(d)) || oct[0] > b'3' {
                return None;
            }
            out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
            i += 4;
        }
    }
    Some(out)
}

fn check_inet(s: &str) -> Option<String> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let max = if addr.parse::<std::net::Ipv4Addr>().is_ok() {
        32
    } else if addr.parse::<std::net::Ipv6Addr>().is_ok() {
        128
    } else {
        return None;
    };
    if let Some(b) = bits {
        b.parse::<u8>().ok().filter(|b| *b <= max)?;
    }
    Some(s.to_owned())
}

/// Binary inet/cidr → (canonical text, is_cidr).
fn inet_binary_to_text(data: &[u8]) -> Option<(String, bool)> {
    let [family, bits, is_cidr, nb, addr @ ..] = data else { return None };
    let (text, max) = match (family, *nb as usize, addr.len()) {
        // PGSQL_AF_INET (AF_INET = 2) and PGSQL_AF_INET6 (AF_INET + 1)
        (2, 4, 4) => (std::net::Ipv4Addr::from(arr::<4>(addr)).to_string(), 32),
        (3, 16, 16) => (std::net::Ipv6Addr::from(arr::<16>(addr)).to_string(), 128),
        _ => return None,
    };
    if *bits > max {
        return None;
    }
    let cidr = *is_cidr != 0;
    Some(if cidr || *bits != max { (format!("{text}/{bits}"), cidr) } else { (text, cidr) })
}

fn date_from_pg_days(days: i32) -> Option<NaiveDate> {
    let unix_days = i64::from(days) + PG_EPOCH_OFFSET_DAYS;
    NaiveDate::from_ymd_opt(1970, 1, 1)?.checked_add_signed(Duration::try_days(unix_days)?)
}

/// Splits `n` leading ASCII digits off `s`, requiring at least `min` and at most `max`.
fn digits(s: &str, min: usize, max: usize) -> Option<(u32, &str)> {
    let n = s.bytes().take_while(|b| b.is_ascii_digit()).count();
    if n < min || n > max {
        return None;
    }
    Some((s[..n].parse().ok()?, &s[n..]))
}

/// `YYYY-MM-DD` (year may exceed 4 digits) with the date part's remainder.
fn parse_date_prefix(s: &str) -> Option<(i32, u32, u32, &str)> {
    let (y, r) = digits(s, 4, 7)?;
    let (m, r) = digits(r.strip_prefix('-')?, 2, 2)?;
    let (d, r) = digits(r.strip_prefix('-')?, 2, 2)?;
    Some((y as i32, m, d, r))
}

/// Year `y` of era BC is astronomical year `1 - y` (1 BC is year 0).
fn ymd(y: i32, m: u32, d: u32, bc: bool) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(if bc { 1 - y } else { y }, m, d)
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    let (y, m, d, rest) = parse_date_prefix(s)?;
    match rest {
        "" => ymd(y, m, d, false),
        " BC" => ymd(y, m, d, true),
        _ => None,
    }
}

/// `HH:MM:SS[.ffffff]` → µs since midnight, and the remainder.
fn parse_time_prefix(s: &str) -> Option<(i64, &str)> {
    let (h, r) = digits(s, 2, 2)?;
    let (mi, r) = digits(r.strip_prefix(':')?, 2, 2)?;
    let (sec, r) = digits(r.strip_prefix(':')?, 2, 2)?;
    let (frac, r) = parse_fraction(r)?;
    if mi > 59 || sec > 60 {
        return None;
    }
    let micros = (i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec)) * 1_000_000 + frac;
    (micros <= MICROS_PER_DAY).then_some((micros, r))
}

/// Optional `.f{1,6}` → µs.
fn parse_fraction(s: &str) -> Option<(i64, &str)> {
    let Some(r) = s.strip_prefix('.') else { return Some((0, s)) };
    let n = r.bytes().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || n > 6 {
        return None;
    }
    let v: i64 = r[..n].parse().ok()?;
    Some((v * 10i64.pow(6 - n as u32), &r[n..]))
}

fn parse_time(s: &str) -> Option<i64> {
    match parse_time_prefix(s)? {
        (us, "") => Some(us),
        _ => None,
    }
}

/// `+HH[:MM[:SS]]` → seconds east of UTC, and the remainder.
fn parse_offset(s: &str) -> Option<(i32, &str)> {
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, mut r) = digits(&s[1..], 2, 2)?;
    let mut secs = h * 3600;
    if let Some(x) = r.strip_prefix(':') {
        let (m, x) = digits(x, 2, 2)?;
        secs += m * 60;
        r = x;
        if let Some(x) = r.strip_prefix(':') {
            let (sec, x) = digits(x, 2, 2)?;
            secs += sec;
            r = x;
        }
    }
    (secs <= 16 * 3600).then_some((sign * secs as i32, r))
}

fn parse_timetz(s: &str) -> Option<(i64, i32)> {
    let (us, r) = parse_time_prefix(s)?;
    match parse_offset(r)? {
        (off, "") => Some((us, off)),
        _ => None,
    }
}

/// `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]][ BC]` → (local time, offset east).
fn parse_timestamp(s: &str, with_zone: bool) -> Option<(NaiveDateTime, i32)> {
    let (y, m, d, r) = parse_date_prefix(s)?;
    let (us, r) = parse_time_prefix(r.strip_prefix(' ')?)?;
    let (offset, r) = if with_zone { parse_offset(r)? } else { (0, r) };
    let bc = match r {
        "" => false,
        " BC" => true,
        _ => return None,
    };
    // 24:00:00 is allowed in time only, not in timestamps.
    if us >= MICROS_PER_DAY {
        return None;
    }
    let time = NaiveTime::from_num_seconds_from_midnight_opt((us / 1_000_000) as u32, (us % 1_000_000) as u32 * 1000)?;
    Some((ymd(y, m, d, bc)?.and_time(time), offset))
}

/// IntervalStyle `postgres`: `[N year[s]] [N mon[s]] [N day[s]] [[+-]H:MM:SS[.f]]`.
fn parse_interval(s: &str) -> Option<(i32, i32, i64)> {
    let (mut months, mut days, mut micros) = (0i32, 0i32, 0i64);
    let mut toks = s.split(' ').filter(|t| !t.is_empty()).peekable();
    let mut any = false;
    while let Some(tok) = toks.next() {
        any = true;
        if tok.contains(':') {
            let (neg, t) = match tok.as_bytes().first()? {
                b'-' => (true, &tok[1..]),
                b'+' => (false, &tok[1..]),
                _ => (false, tok),
            };
            let (h, r) = t.split_once(':')?;
            let h: i64 = h.parse().ok().filter(|_| h.bytes().all(|b| b.is_ascii_digit()))?;
            let (mi, r) = digits(r, 2, 2)?;
            let (sec, r) = digits(r.strip_prefix(':')?, 2, 2)?;
            let (frac, r) = parse_fraction(r)?;
            if !r.is_empty() || toks.peek().is_some() {
                return None;
            }
            let v = h
                .checked_mul(3_600_000_000)?
                .checked_add(i64::from(mi) * 60_000_000 + i64::from(sec) * 1_000_000 + frac)?;
            micros = micros.checked_add(if neg { -v } else { v })?;
        } else {
            let n: i32 = tok.strip_prefix('+').unwrap_or(tok).parse().ok()?;
            match toks.next()? {
                "year" | "years" => months = months.checked_add(n.checked_mul(12)?)?,
                "mon" | "mons" => months = months.checked_add(n)?,
                "day" | "days" => days = days.checked_add(n)?,
                _ => return None,
            }
        }
    }
    any.then_some((months, days, micros))
}

fn format_time(us: i64) -> String {
    let (secs, frac) = (us / 1_000_000, us % 1_000_000);
    let base = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        base
    } else {
        format!("{base}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

fn format_offset(east: i32) -> String {
    let sign = if east < 0 { '-' } else { '+' };
    let a = east.unsigned_abs();
    let mut s = format!("{sign}{:02}:{:02}", a / 3600, a / 60 % 60);
    if a % 60 != 0 {
        s.push_str(&format!(":{:02}", a % 60));
    }
    s
}

/// ISO-8601 duration, e.g. `P1Y2M3DT4H5M6.5S`; `PT0S` for zero.
fn iso_duration(months: i32, days: i32, micros: i64) -> String {
    let mut s = String::from("P");
    let (y, m) = (months / 12, months % 12);
    for (v, u) in [(y as i64, 'Y'), (m as i64, 'M'), (days as i64, 'D')] {
        if v != 0 {
            s.push_str(&format!("{v}{u}"));
        }
    }
    if micros != 0 {
        s.push('T');
        let neg = micros < 0;
        let a = micros.unsigned_abs();
        let (h, mi, sec, frac) = (a / 3_600_000_000, a / 60_000_000 % 60, a / 1_000_000 % 60, a % 1_000_000);
        let sign = if neg { "-" } else { "" };
        if h != 0 {
            s.push_str(&format!("{sign}{h}H"));
        }
        if mi != 0 {
            s.push_str(&format!("{sign}{mi}M"));
        }
        if sec != 0 || frac != 0 {
            let f = if frac == 0 { String::new() } else { format!(".{}", format!("{frac:06}").trim_end_matches('0')) };
            s.push_str(&format!("{sign}{sec}{f}S"));
        }
    }
    if s == "P" {
        s.push_str("T0S");
    }
    s
}

fn parse_text_array(array_oid: u32, elem: u32, raw: &[u8]) -> Result<Value, ValueError> {
    let e = |reason: &str| err_text(array_oid, raw, reason);
    let s = std::str::from_utf8(raw).map_err(|_| e("invalid UTF-8"))?;
    let mut p = ArrayText { s: s.as_bytes(), pos: 0, values: Vec::new(), lens: Vec::new(), leaf_depth: None, elem };
    // Optional explicit bounds: `[1:3][0:1]={...}`.
    let mut lowers = Vec::new();
    if p.peek() == Some(b'[') {
        while p.peek() == Some(b'[') {
            p.pos += 1;
            let lo = p.int().ok_or_else(|| e("bad array bounds"))?;
            p.expect(b':').ok_or_else(|| e("bad array bounds"))?;
            p.int().ok_or_else(|| e("bad array bounds"))?;
            p.expect(b']').ok_or_else(|| e("bad array bounds"))?;
            lowers.push(lo);
        }
        p.expect(b'=').ok_or_else(|| e("bad array bounds"))?;
    }
    p.expect(b'{').ok_or_else(|| e("array must start with {"))?;
    p.level(0).map_err(|r| e(&r))?;
    if p.pos != p.s.len() {
        return Err(e("trailing characters after array"));
    }
    let ArrayText { values, lens, .. } = p;
    let lens: Vec<usize> = if values.is_empty() { Vec::new() } else { lens.into_iter().flatten().collect() };
    if !lowers.is_empty() && lowers.len() != lens.len() {
        return Err(e("bounds do not match dimensions"));
    }
    let dims = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| ArrayDim { len, lower_bound: lowers.get(i).copied().unwrap_or(1) })
        .collect();
    Ok(Value::Array { elem_oid: elem, dims, values })
}

struct ArrayText<'a> {
    s: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    /// Length of each dimension, fixed by the first sub-array seen at that depth.
    lens: Vec<Option<usize>>,
    /// Nesting depth of the scalars; all must sit at the same depth.
    leaf_depth: Option<usize>,
    elem: u32,
}

impl ArrayText<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn expect(&mut self, c: u8) -> Option<()> {
        (self.peek() == Some(c)).then(|| self.pos += 1)
    }
    fn int(&mut self) -> Option<i32> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        std::str::from_utf8(self.s.get(start..self.pos)?).ok()?.parse().ok()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// Parses the inside of a `{...}` at nesting `depth` (the `{` is consumed).
    fn level(&mut self, depth: usize) -> Result<(), String> {
        if depth >= MAX_ARRAY_DIMS {
            return Err("more than 6 dimensions".into());
        }
        if self.lens.len() <= depth {
            self.lens.resize(depth + 1, None);
        }
        let mut count = 0usize;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return self.record(depth, 0);
        }
        loop {
            self.skip_ws();
            if self.peek() == Some(b'{') {
                if self.leaf_depth.is_some_and(|d| d <= depth) {
                    return Err("mixed scalars and sub-arrays".into());
                }
                self.pos += 1;
                self.level(depth + 1)?;
            } else {
                if self.leaf_depth.is_some_and(|d| d != depth) {
                    return Err("mixed scalars and sub-arrays".into());
                }
                self.leaf_depth = Some(depth);
                let (text, quoted) = self.element()?;
                let v = if !quoted && text.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    Value::from_text(self.elem, text.as_bytes()).map_err(|e| e.reason)?
                };
                self.values.push(v);
            }
            count += 1;
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return self.record(depth, count);
                }
                _ => return Err("expected , or }".into()),
            }
        }
    }

    fn record(&mut self, depth: usize, count: usize) -> Result<(), String> {
        match self.lens.get_mut(depth) {
            Some(Some(n)) if *n != count => Err("ragged multi-dimensional array".into()),
            Some(slot) => {
                *slot = Some(count);
                Ok(())
            }
            None => Err("ragged multi-dimensional array".into()),
        }
    }

    /// One element, unescaped; `quoted` tells `"NULL"` from `NULL`.
    fn element(&mut self) -> Result<(String, bool), String> {
        let mut out = Vec::new();
        if self.peek() == Some(b'"') {
            self.pos += 1;
            loop {
                match self.peek() {
                    None => return Err("unterminated quoted element".into()),
                    Some(b'"') => {
                        self.pos += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let c = self.s.get(self.pos + 1).copied().ok_or("dangling backslash")?;
                        out.push(c);
                        self.pos += 2;
                    }
                    Some(c) => {
                        out.push(c);
                        self.pos += 1;
                    }
                }
            }
            return String::from_utf8(out).map(|s| (s, true)).map_err(|_| "invalid UTF-8".into());
        }
        while let Some(c) = self.peek() {
            match c {
                b',' | b'}' => break,
                b'{' | b'"' => return Err("unexpected character in unquoted element".into()),
                b'\\' => {
                    let c = self.s.get(self.pos + 1).copied().ok_or("dangling backslash")?;
                    out.push(c);
                    self.pos += 2;
                }
                c => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        let s = String::from_utf8(out).map_err(|_| "invalid UTF-8".to_string())?;
        let t = s.trim_end_matches(|c: char| c.is_ascii_whitespace());
        if t.is_empty() {
            return Err("empty unquoted element".into());
        }
        Ok((t.to_owned(), false))
    }
}

fn parse_binary_array(array_oid: u32, elem: u32, data: &[u8]) -> Result<Value, ValueError> {
    let e = |reason: &str| err_bin(array_oid, data, reason);
    let mut pos = 0usize;
    let i32_at = |pos: &mut usize, what: &str| -> Result<i32, ValueError> {
        let b = data.get(*pos..*pos + 4).ok_or_else(|| e(&format!("truncated {what}")))?;
        *pos += 4;
        Ok(i32::from_be_bytes(arr(b)))
    };
    let ndim = usize::try_from(i32_at(&mut pos, "dimension count")?).map_err(|_| e("negative dimension count"))?;
    let _has_null = i32_at(&mut pos, "null flag")?;
    let elem_oid = i32_at(&mut pos, "element type")? as u32;
    if ndim > MAX_ARRAY_DIMS {
        return Err(e("more than 6 dimensions"));
    }
    if elem_oid != elem {
        return Err(e(&format!("element type {elem_oid} does not match array type (expected {elem})")));
    }
    let mut dims = Vec::with_capacity(ndim);
    let mut total = if ndim == 0 { 0usize } else { 1 };
    for _ in 0..ndim {
        let len = usize::try_from(i32_at(&mut pos, "dimension length")?).map_err(|_| e("negative dimension length"))?;
        let lower_bound = i32_at(&mut pos, "lower bound")?;
        total = total.checked_mul(len).ok_or_else(|| e("too many elements"))?;
        dims.push(ArrayDim { len, lower_bound });
    }
    // Each element takes at least its 4-byte length.
    let mut values = Vec::with_capacity(total.min(data.len().saturating_sub(pos) / 4));
    for _ in 0..total {
        let len = i32_at(&mut pos, "element length")?;
        if len == -1 {
            values.push(Value::Null);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| e("negative element length"))?;
        let b = data.get(pos..pos.saturating_add(len)).ok_or_else(|| e("truncated element"))?;
        pos += len;
        values.push(Value::from_binary(elem, b).map_err(|x| ValueError { oid: array_oid, ..x })?);
    }
    if pos != data.len() {
        return Err(e("trailing bytes after array"));
    }
    Ok(Value::Array { elem_oid: elem, dims, values })
}

/// Written straight to the serializer (no intermediate JSON tree: this runs
/// for every column of every change). The shape is documented on
/// `Value::to_json`.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int2(i) => s.serialize_i16(*i),
            Value::Int4(i) => s.serialize_i32(*i),
            Value::Int8(i) => s.serialize_i64(*i),
            // Through the shortest decimal form, so 1.23456f32 stays 1.23456.
            Value::Float4(f) => serialize_float(s, f.to_string().parse().unwrap_or(f64::NAN), f.is_nan()),
            Value::Float8(f) => serialize_float(s, *f, f.is_nan()),
            Value::Numeric(t) | Value::Text(t) | Value::Inet(t) | Value::Cidr(t) => s.serialize_str(t),
            Value::Unknown { text, .. } => s.serialize_str(text),
            Value::Uuid(u) => s.serialize_str(u.hyphenated().encode_lower(&mut Uuid::encode_buffer())),
            Value::Date(d) => match IsoText::date(*d) {
                Some(text) => s.serialize_str(text.as_str()),
                None => s.collect_str(&d.format("%Y-%m-%d")),
            },
            Value::Time(us) => s.serialize_str(&format_time(*us)),
            Value::TimeTz { micros, offset_secs } => {
                s.collect_str(&format_args!("{}{}", format_time(*micros), format_offset(*offset_secs)))
            }
            Value::Timestamp(t) => match IsoText::datetime(*t, "") {
                Some(text) => s.serialize_str(text.as_str()),
                None => s.collect_str(&t.format("%Y-%m-%dT%H:%M:%S%.f")),
            },
            Value::TimestampTz(t) => match IsoText::datetime(t.naive_utc(), "Z") {
                Some(text) => s.serialize_str(text.as_str()),
                None => s.collect_str(&t.format("%Y-%m-%dT%H:%M:%S%.fZ")),
            },
            Value::Infinity { negative, .. } => s.serialize_str(if *negative { "-infinity" } else { "infinity" }),
            Value::Interval { months, days, micros } => s.serialize_str(&iso_duration(*months, *days, *micros)),
            Value::Json { value, .. } => value.serialize(s),
            Value::Bytea(b) => s.collect_str(&format_args!("\\x{}", hex::encode(b))),
            Value::Array { dims, values, .. } => {
                let lens: Vec<usize> = dims.iter().map(|d| d.len).collect();
                Nested { lens: &lens, values }.serialize(s)
            }
        }
    }
}

/// ISO-8601 text of a date or date-time, written digit by digit: the same
/// text as chrono's `%Y-%m-%d` / `%Y-%m-%dT%H:%M:%S%.f` (fraction in groups
/// of 3, 6 or 9 digits, none when zero), without parsing a format string for
/// every value (this runs for every timestamp of every change). `None` for
/// what chrono writes with a sign (years outside 0..=9999) or a leap second:
/// the caller falls back to chrono for those.
struct IsoText {
    buf: [u8; 32],
    len: usize,
}

impl IsoText {
    fn date(d: NaiveDate) -> Option<IsoText> {
        use chrono::Datelike;
        if !(0..=9999).contains(&d.year()) {
            return None;
        }
        let mut t = IsoText { buf: [0; 32], len: 0 };
        t.digits(d.year() as u32, 4);
        t.push(b'-');
        t.digits(d.month(), 2);
        t.push(b'-');
        t.digits(d.day(), 2);
        Some(t)
    }

    fn datetime(dt: NaiveDateTime, suffix: &str) -> Option<IsoText> {
        use chrono::Timelike;
        let nanos = dt.nanosecond();
        if nanos >= 1_000_000_000 {
            return None;
        }
        let mut t = IsoText::date(dt.date())?;
        t.push(b'T');
        t.digits(dt.hour(), 2);
        t.push(b':');
        t.digits(dt.minute(), 2);
        t.push(b':');
        t.digits(dt.second(), 2);
        if nanos != 0 {
            t.push(b'.');
            match (nanos % 1_000_000, nanos % 1_000) {
                (0, _) => t.digits(nanos / 1_000_000, 3),
                (_, 0) => t.digits(nanos / 1_000, 6),
                _ => t.digits(nanos, 9),
            }
        }
        for &b in suffix.as_bytes() {
            t.push(b);
        }
        Some(t)
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// `n` zero-padded to `width` digits (n has at most that many).
    fn digits(&mut self, mut n: u32, width: usize) {
        for i in (0..width).rev() {
            self.buf[self.len + i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and punctuation were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

fn serialize_float<S: Serializer>(s: S, f: f64, nan: bool) -> Result<S::Ok, S::Error> {
    if nan {
        s.serialize_str("NaN")
    } else if f.is_infinite() {
        s.serialize_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        s.serialize_f64(f)
    }
}

/// An array's elements as nested JSON arrays following its dimensions.
struct Nested<'a> {
    lens: &'a [usize],
    values: &'a [Value],
}

impl Serialize for Nested<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.lens.split_first() {
            None | Some((_, [])) => s.collect_seq(self.values),
            Some((_, rest)) => {
                let stride: usize = rest.iter().product::<usize>().max(1);
                let mut seq = s.serialize_seq(None)?;
                for chunk in self.values.chunks(stride) {
                    seq.serialize_element(&Nested { lens: rest, values: chunk })?;
                }
                seq.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn t(oid: u32, s: &str) -> Value {
        Value::from_text(oid, s.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn scalars_from_text() {
        assert_eq!(t(oid::BOOL, "t"), Value::Bool(true));
        assert_eq!(t(oid::BOOL, "f"), Value::Bool(false));
        assert!(Value::from_text(oid::BOOL, b"yes").is_err());
        assert_eq!(t(oid::INT2, "-32768"), Value::Int2(i16::MIN));
        assert_eq!(t(oid::INT8, "9223372036854775807"), Value::Int8(i64::MAX));
        assert!(Value::from_text(oid::INT4, b"2147483648").is_err());
        assert_eq!(t(oid::FLOAT4, "1.23456"), Value::Float4(1.23456));
        assert_eq!(t(oid::FLOAT8, "-Infinity"), Value::Float8(f64::NEG_INFINITY));
        assert!(matches!(t(oid::FLOAT8, "NaN"), Value::Float8(f) if f.is_nan()));
        assert!(Value::from_text(oid::FLOAT8, b"inf").is_err());
        assert_eq!(t(oid::NUMERIC, "-0.000001"), Value::Numeric("-0.000001".into()));
        assert_eq!(t(oid::NUMERIC, "NaN"), Value::Numeric("NaN".into()));
        assert!(Value::from_text(oid::NUMERIC, b"1.2.3").is_err());
        assert_eq!(t(oid::BPCHAR, "ab   "), Value::Text("ab   ".into()));
        assert_eq!(
            t(oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").as_uuid().unwrap().to_string(),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        let j = t(oid::JSONB, r#"{"ü": [1, null]}"#);
        assert_eq!(j.to_json(), json!({"ü": [1, null]}));
        assert!(matches!(&j, Value::Json { text, .. } if &**text == r#"{"ü": [1, null]}"#), "{j:?}");
        assert_eq!(t(oid::BYTEA, "\\x00ff10"), Value::Bytea(vec![0, 255, 16]));
        assert_eq!(t(oid::BYTEA, "a\\\\b\\001"), Value::Bytea(b"a\\b\x01".to_vec()));
        assert!(Value::from_text(oid::BYTEA, b"\\xzz").is_err());
        assert_eq!(t(oid::INET, "192.168.1.5/24"), Value::Inet("192.168.1.5/24".into()));
        assert_eq!(t(oid::CIDR, "2001:db8::/32"), Value::Cidr("2001:db8::/32".into()));
        assert!(Value::from_text(oid::INET, b"1.2.3.4/33").is_err());
    }

    #[test]
    fn dates_and_times_from_text() {
        assert_eq!(t(oid::TIMESTAMPTZ, "2026-11-28 12:00:00.123+00").to_json(), "2026-11-28T12:00:00.123Z");
        assert_eq!(t(oid::TIMESTAMPTZ, "2026-11-28 17:30:00+05:30"), Value::TimestampTz(ts("2026-11-28T12:00:00Z")));
        assert_eq!(t(oid::TIMESTAMPTZ, "2026-11-28 07:00:06-05"), Value::TimestampTz(ts("2026-11-28T12:00:06Z")));
        // Local mean time offsets carry seconds.
        assert_eq!(t(oid::TIMESTAMPTZ, "1900-01-01 04:20:58+05:21:10"), Value::TimestampTz(ts("1899-12-31T22:59:48Z")));
        assert_eq!(t(oid::TIMESTAMPTZ, "-infinity"), Value::Infinity { oid: oid::TIMESTAMPTZ, negative: true });
        assert_eq!(t(oid::TIMESTAMPTZ, "infinity").as_timestamp_millis(), None);
        assert_eq!(t(oid::TIMESTAMP, "2026-11-28 12:00:00.123456").to_json(), "2026-11-28T12:00:00.123456");
        assert_eq!(t(oid::TIMESTAMP, "1970-01-01 00:00:01").as_timestamp_millis(), Some(1000));
        assert_eq!(t(oid::TIMESTAMP, "0001-01-01 00:00:00 BC").to_json(), "0000-01-01T00:00:00");
        assert_eq!(t(oid::DATE, "0044-03-15 BC"), Value::Date(NaiveDate::from_ymd_opt(-43, 3, 15).unwrap()));
        assert_eq!(t(oid::DATE, "10000-01-01"), Value::Date(NaiveDate::from_ymd_opt(10000, 1, 1).unwrap()));
        assert_eq!(t(oid::DATE, "infinity").to_json(), "infinity");
        assert!(Value::from_text(oid::DATE, b"2026-02-30").is_err());
        assert_eq!(t(oid::TIME, "24:00:00"), Value::Time(MICROS_PER_DAY));
        assert_eq!(t(oid::TIME, "04:05:06.789").to_json(), "04:05:06.789");
        assert!(Value::from_text(oid::TIME, b"24:00:01").is_err());
        assert_eq!(t(oid::TIMETZ, "00:00:00-12"), Value::TimeTz { micros: 0, offset_secs: -43_200 });
        assert_eq!(t(oid::TIMETZ, "04:05:06+05:30").to_json(), "04:05:06+05:30");
    }

    /// Milliseconds are floored (toward -infinity), also before 1970, where
    /// truncating toward zero would move a timestamp 1 ms later; text and
    /// binary (the stream and the COPY path) agree.
    #[test]
    fn timestamp_millis_floor_before_and_after_1970() {
        let cases = [
            ("1970-01-01 00:00:00.0005+00", 0),
            ("1970-01-01 00:00:00.000999+00", 0),
            ("1970-01-01 00:00:00.001+00", 1),
            ("1969-12-31 23:59:59.9995+00", -1),
            ("1969-12-31 23:59:59.999999+00", -1),
            ("1969-12-31 23:59:59.999+00", -1),
            ("1969-12-31 23:59:59.998001+00", -2),
            ("1969-12-31 23:59:59+00", -1000),
            ("1900-01-01 00:00:00.0001+00", -2_208_988_800_000),
            ("1899-12-31 23:59:59.9999+00", -2_208_988_800_001),
            ("2026-11-28 12:00:00.123999+00", 1_795_867_200_123),
        ];
        let b = |oid, d: &[u8]| Value::from_binary(oid, d).unwrap();
        for (text, ms) in cases {
            let v = t(oid::TIMESTAMPTZ, text);
            assert_eq!(v.as_timestamp_millis(), Some(ms), "{text}");
            let Value::TimestampTz(ts) = v else { panic!("{text}") };
            let pg_us = ts.timestamp_micros() - crate::source::PG_EPOCH_OFFSET_US;
            assert_eq!(b(oid::TIMESTAMPTZ, &pg_us.to_be_bytes()).as_timestamp_millis(), Some(ms), "{text} (binary)");
            assert_eq!(b(oid::TIMESTAMP, &pg_us.to_be_bytes()).as_timestamp_millis(), Some(ms), "{text} (timestamp)");
            let naive = text.trim_end_matches("+00");
            assert_eq!(t(oid::TIMESTAMP, naive).as_timestamp_millis(), Some(ms), "{naive}");
        }
    }

    #[test]
    fn intervals_postgres_style() {
        let iv = |m, d, us| Value::Interval { months: m, days: d, micros: us };
        assert_eq!(t(oid::INTERVAL, "1 year 2 mons 3 days 04:05:06.5"), iv(14, 3, 14_706_500_000));
        assert_eq!(t(oid::INTERVAL, "-1 years -2 mons +3 days -04:05:06.000001"), iv(-14, 3, -14_706_000_001));
        assert_eq!(t(oid::INTERVAL, "00:00:00"), iv(0, 0, 0));
        assert_eq!(t(oid::INTERVAL, "1 day"), iv(0, 1, 0));
        assert_eq!(t(oid::INTERVAL, "178000000 years"), iv(2_136_000_000, 0, 0));
        assert_eq!(t(oid::INTERVAL, "1000:00:00"), iv(0, 0, 3_600_000_000_000));
        assert!(Value::from_text(oid::INTERVAL, b"1 fortnight").is_err());
        assert!(Value::from_text(oid::INTERVAL, b"").is_err());
        assert_eq!(iv(14, 3, 14_706_500_000).to_json(), "P1Y2M3DT4H5M6.5S");
        assert_eq!(iv(0, 0, -1_000_001).to_json(), "PT-1.000001S");
        assert_eq!(iv(0, 0, 0).to_json(), "PT0S");
    }

    #[test]
    fn text_arrays() {
        let v = t(1009, r#"{"a b","c,d","e\"f","g\\h",NULL,"NULL","", plain }"#);
        assert_eq!(v.to_json(), json!(["a b", "c,d", "e\"f", "g\\h", null, "NULL", "", "plain"]));
        let Value::Array { elem_oid, dims, .. } = &v else { panic!() };
        assert_eq!((*elem_oid, dims.as_slice()), (oid::TEXT, &[ArrayDim { len: 8, lower_bound: 1 }][..]));
        assert_eq!(t(1007, "{{1,2,3},{4,5,6}}").to_json(), json!([[1, 2, 3], [4, 5, 6]]));
        assert_eq!(t(1007, "{}"), Value::Array { elem_oid: oid::INT4, dims: vec![], values: vec![] });
        let Value::Array { dims, .. } = t(1007, "[0:1]={7,8}") else { panic!() };
        assert_eq!(dims, vec![ArrayDim { len: 2, lower_bound: 0 }]);
        assert_eq!(t(1001, r#"{"\\x00ab",NULL}"#).to_json(), json!(["\\x00ab", null]));
        assert_eq!(t(3807, r#"{"{\"a\": 1}",[]}"#).to_json(), json!([{"a": 1}, []]));
        assert_eq!(
            t(1185, r#"{"2026-11-28 12:00:00+00",-infinity}"#).to_json(),
            json!(["2026-11-28T12:00:00Z", "-infinity"])
        );
        for bad in ["{{1,2},{3}}", "{1,{2}}", "{{1},2}", "{1,2", "1,2}", "{1,,2}", "{{{{{{{1}}}}}}}", "{\"a}", "{1}x"] {
            assert!(Value::from_text(1007, bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(Value::from_text(1007, b"{1,x}").is_err());
    }

    #[test]
    fn unknown_types_never_fail() {
        assert_eq!(t(16_400, "happy"), Value::Unknown { oid: 16_400, text: "happy".into() });
        assert_eq!(t(16_400, "happy").as_str(), Some("happy"));
        assert_eq!(Value::from_text(16_400, b"\xff").unwrap(), Value::Unknown { oid: 16_400, text: "\u{fffd}".into() });
        assert_eq!(
            Value::from_binary(16_400, b"\xff\x00").unwrap(),
            Value::Unknown { oid: 16_400, text: "\\xff00".into() }
        );
        assert_eq!(Value::from_binary(16_400, b"ok").unwrap().as_str(), Some("ok"));
    }

    fn numeric_bin(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(digits.len() as u16).to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_binary_exact() {
        let n = |w, s, d, ds: &[u16]| Value::from_binary(oid::NUMERIC, &numeric_bin(w, s, d, ds)).unwrap();
        assert_eq!(n(0, 0, 2, &[1, 1000]), Value::Numeric("1.10".into()));
        assert_eq!(n(-2, 0x4000, 6, &[100]), Value::Numeric("-0.000001".into()));
        assert_eq!(n(0, 0, 0, &[]), Value::Numeric("0".into()));
        assert_eq!(n(1, 0, 0, &[12, 3456]), Value::Numeric("123456".into()));
        assert_eq!(n(2, 0, 0, &[1]), Value::Numeric("100000000".into()));
        assert_eq!(n(0, 0xC000, 0, &[]), Value::Numeric("NaN".into()));
        assert_eq!(n(0, 0xF000, 0, &[]), Value::Numeric("-Infinity".into()));
        assert!(Value::from_binary(oid::NUMERIC, &numeric_bin(0, 0, 0, &[10_000])).is_err());
        assert!(Value::from_binary(oid::NUMERIC, &numeric_bin(0, 0x1234, 0, &[1])).is_err());
        assert_eq!(n(0, 0, 2, &[1, 1000]).as_decimal(), Some("1.10".parse().unwrap()));
        assert_eq!(n(0, 0, 2, &[1, 1000]).as_f64(), Some(1.1));
    }

    #[test]
    fn binary_scalars() {
        let b = |oid, d: &[u8]| Value::from_binary(oid, d).unwrap();
        assert_eq!(b(oid::INT4, &7i32.to_be_bytes()), Value::Int4(7));
        assert!(Value::from_binary(oid::INT4, &[0, 0, 7]).is_err());
        assert_eq!(b(oid::DATE, &0i32.to_be_bytes()), Value::Date(NaiveDate::from_ymd_opt(2000, 1, 1).unwrap()));
        assert_eq!(b(oid::DATE, &i32::MAX.to_be_bytes()), Value::Infinity { oid: oid::DATE, negative: false });
        assert_eq!(b(oid::TIMESTAMPTZ, &1_000_000i64.to_be_bytes()), Value::TimestampTz(ts("2000-01-01T00:00:01Z")));
        let mut tz = 3_600_000_000i64.to_be_bytes().to_vec();
        tz.extend_from_slice(&(-19_800i32).to_be_bytes());
        assert_eq!(b(oid::TIMETZ, &tz), Value::TimeTz { micros: 3_600_000_000, offset_secs: 19_800 });
        assert_eq!(b(oid::JSONB, b"\x01{\"a\":1}"), Value::json(r#"{"a":1}"#).unwrap());
        assert_eq!(b(oid::JSONB, b"\x01{\"a\":1}").to_json(), json!({"a": 1}));
        assert!(Value::from_binary(oid::JSONB, b"\x02{}").is_err());
        assert_eq!(b(oid::INET, &[2, 32, 0, 4, 10, 1, 2, 3]), Value::Inet("10.1.2.3".into()));
        assert_eq!(b(oid::INET, &[2, 24, 0, 4, 192, 168, 1, 5]), Value::Inet("192.168.1.5/24".into()));
        assert_eq!(b(oid::CIDR, &[2, 8, 1, 4, 10, 0, 0, 0]), Value::Cidr("10.0.0.0/8".into()));
        let mut v6 = vec![3, 128, 0, 16];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(b(oid::INET, &v6), Value::Inet("::1".into()));
    }

    #[test]
    fn binary_arrays() {
        let mut a = Vec::new();
        for x in [2i32, 1, oid::INT4 as i32, 2, 1, 2, 1] {
            a.extend_from_slice(&x.to_be_bytes());
        }
        for x in [Some(1i32), None, Some(3), Some(4)] {
            match x {
                Some(x) => {
                    a.extend_from_slice(&4i32.to_be_bytes());
                    a.extend_from_slice(&x.to_be_bytes());
                }
                None => a.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(Value::from_binary(1007, &a).unwrap().to_json(), json!([[1, null], [3, 4]]));
        // Element type must match the array type.
        let mut wrong = a.clone();
        wrong[8..12].copy_from_slice(&(oid::INT8 as i32).to_be_bytes());
        assert!(Value::from_binary(1007, &wrong).is_err());
        // Huge claimed dimensions with no data behind them.
        let mut huge = Vec::new();
        for x in [3i32, 0, oid::INT4 as i32, i32::MAX, 1, i32::MAX, 1, i32::MAX, 1] {
            huge.extend_from_slice(&x.to_be_bytes());
        }
        assert!(Value::from_binary(1007, &huge).is_err());
    }

    #[test]
    fn json_forms() {
        assert_eq!(Value::Float4(1.23456).to_json(), json!(1.23456));
        assert_eq!(Value::Float8(f64::NAN).to_json(), "NaN");
        assert_eq!(Value::Float4(f32::INFINITY).to_json(), "Infinity");
        assert_eq!(Value::Numeric("1.10".into()).to_json(), "1.10");
        assert_eq!(Value::Bytea(vec![0, 255]).to_json(), "\\x00ff");
        assert_eq!(Value::Time(1_500_000).to_json(), "00:00:01.5");
        assert_eq!(Value::Null.to_json(), Json::Null);
    }

    const OIDS: &[u32] = &[
        16, 17, 19, 20, 21, 23, 25, 114, 650, 700, 701, 869, 1042, 1043, 1082, 1083, 1114, 1184, 1186, 1266, 1700,
        2950, 3802, 1000, 1001, 1005, 1007, 1016, 1009, 1015, 1021, 1022, 1231, 2951, 1182, 1115, 1185, 3807, 199,
        1041, 651, 1014, 1183, 1187, 1270, 99_999,
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The digit-by-digit ISO text is chrono's, for every instant
        /// PostgreSQL can hold (chrono's own path covers the rest).
        #[test]
        fn iso_text_is_chronos(micros in -210_000_000_000_000_000i64..8_000_000_000_000_000_000i64, nanos in 0u32..3, zulu in any::<bool>()) {
            use chrono::Timelike;
            let base = DateTime::from_timestamp_micros(micros).unwrap().naive_utc();
            // Also whole seconds and milliseconds, and nanosecond precision.
            let t = match nanos {
                0 => base.with_nanosecond(0).unwrap(),
                1 => base.with_nanosecond(base.nanosecond() / 1_000_000 * 1_000_000).unwrap(),
                _ => base.with_nanosecond(base.nanosecond() + 7).unwrap(),
            };
            let (suffix, fmt) = if zulu { ("Z", "%Y-%m-%dT%H:%M:%S%.fZ") } else { ("", "%Y-%m-%dT%H:%M:%S%.f") };
            let want = t.format(fmt).to_string();
            match IsoText::datetime(t, suffix) {
                Some(text) => prop_assert_eq!(text.as_str(), want.as_str()),
                None => prop_assert!(want.starts_with('-') || want.starts_with('+'), "{}", want),
            }
            let want = t.date().format("%Y-%m-%d").to_string();
            if let Some(text) = IsoText::date(t.date()) {
                prop_assert_eq!(text.as_str(), want.as_str());
            }
        }

        #[test]
        fn arbitrary_input_never_panics(i in 0..OIDS.len(), data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Value::from_text(OIDS[i], &data).map(|v| v.to_json());
            let _ = Value::from_binary(OIDS[i], &data).map(|v| v.to_json());
        }

        #[test]
        fn text_like_input_never_panics(i in 0..OIDS.len(), s in r#"[-+0-9:. {}",\\NULBCinfty]{0,40}"#) {
            let _ = Value::from_text(OIDS[i], s.as_bytes()).map(|v| v.to_json());
        }

        #[test]
        fn timestamptz_binary_text_agree(us in -200_000_000_000_000_000i64..200_000_000_000_000_000i64) {
            let b = Value::from_binary(oid::TIMESTAMPTZ, &us.to_be_bytes()).unwrap();
            let Value::TimestampTz(t) = b.clone() else { panic!() };
            let text = t.format("%Y-%m-%d %H:%M:%S%.f+00").to_string();
            if t.format("%Y").to_string().starts_with('-') { return Ok(()); }
            prop_assert_eq!(Value::from_text(oid::TIMESTAMPTZ, text.as_bytes()).unwrap(), b);
        }

        #[test]
        fn numeric_binary_matches_decimal(n in any::<i64>(), scale in 0u32..10) {
            // Build PostgreSQL's binary form of n / 10^scale and compare to rust_decimal's text.
            let d = rust_decimal::Decimal::new(n, scale);
            let text = d.to_string();
            let Value::Numeric(ours) = Value::from_binary(oid::NUMERIC, &to_numeric_binary(&text)).unwrap() else { panic!() };
            prop_assert_eq!(ours, text);
        }
    }

    /// Test-only encoder mirroring PostgreSQL's numeric_send for plain decimals.
    fn to_numeric_binary(text: &str) -> Vec<u8> {
        let (neg, t) = match text.strip_prefix('-') {
            Some(t) => (true, t),
            None => (false, text),
        };
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        let dscale = frac.len() as u16;
        let int = int.trim_start_matches('0');
        let int_pad = (4 - int.len() % 4) % 4;
        let frac_pad = (4 - frac.len() % 4) % 4;
        let all = format!("{}{}{}{}", "0".repeat(int_pad), int, frac, "0".repeat(frac_pad));
        let mut digits: Vec<u16> =
            all.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).unwrap().parse().unwrap()).collect();
        let mut weight = ((int.len() + int_pad) / 4) as i16 - 1;
        while digits.first() == Some(&0) {
            digits.remove(0);
            weight -= 1;
        }
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            weight = 0;
        }
        numeric_bin(weight, if neg && !digits.is_empty() { 0x4000 } else { 0 }, dscale, &digits)
    }
}
