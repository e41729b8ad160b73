//! Column values and schemas as Debezium's PostgreSQL connector writes them
//! through Kafka Connect's JSON converter: which Connect type and logical
//! name a column gets (from its type, type modifier and the handling-mode
//! options) and how each value is written under it.
//!
//! The choice is made once per relation ([`Kind::of`]); writing a value
//! (`write_value`) is then a match on the kind and the value, straight into
//! the output bytes.

use std::io::Write;

use base64::Engine;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike, Utc};

use crate::config::{BinaryHandlingMode, DebeziumConfig, DecimalHandlingMode, IntervalHandlingMode, TimePrecisionMode};
use crate::source::values::{oid, ArrayDim, Value};
use crate::source::ColumnMeta;

/// Debezium's `MicroDuration.DAYS_PER_MONTH_AVG`: a month of an interval
/// counts as 365.25 / 12 days.
const DAYS_PER_MONTH_AVG: f64 = 365.25 / 12.0;

/// What Debezium writes for a `timestamp` of `infinity` / `-infinity`:
/// pgjdbc's `DATE_POSITIVE_INFINITY` / `DATE_NEGATIVE_INFINITY`, read as
/// microseconds since the epoch.
const TIMESTAMP_INFINITY_MICROS: i64 = 9_223_372_036_825_200_000;
const TIMESTAMP_NEG_INFINITY_MICROS: i64 = -9_223_372_036_832_400_000;
/// What Debezium writes for a `date` of `infinity` / `-infinity`: the epoch
/// days of the dates its decoder maps them to (-5877611-06-21 and -22).
const DATE_INFINITY_DAYS: i64 = -2_147_472_692;
const DATE_NEG_INFINITY_DAYS: i64 = -2_147_472_691;

const OID_CHAR: u32 = 18;
const OID_OID: u32 = 26;
const OID_XML: u32 = 142;
/// Types Debezium passes on as their text: macaddr, macaddr8, the ranges, tsvector.
const TEXT_TYPES: &[u32] = &[829, 774, 3904, 3906, 3908, 3910, 3912, 3926, 3614];

/// How a column is encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// text and the types Debezium sends as their text.
    Text,
    /// An enum: its label, schema `io.debezium.data.Enum`.
    Enum(std::sync::Arc<str>),
    Xml,
    Json,
    Uuid,
    Binary(BinaryHandlingMode),
    /// `decimal.handling.mode=precise` with a declared scale: Connect's Decimal.
    Decimal {
        precision: u32,
        scale: u32,
    },
    /// precise without a declared scale: Debezium's VariableScaleDecimal.
    VariableDecimal,
    DecimalString,
    DecimalDouble,
    /// Days since the epoch (`io.debezium.time.Date`, or Connect's Date).
    Date {
        connect: bool,
    },
    /// Milliseconds past midnight (`io.debezium.time.Time`, or Connect's Time).
    TimeMillis {
        connect: bool,
    },
    TimeMicros,
    /// Milliseconds since the epoch (`io.debezium.time.Timestamp`, or Connect's).
    TimestampMillis {
        connect: bool,
    },
    TimestampMicros,
    /// ISO-8601 in UTC with `fraction` digits (0: as many as needed).
    ZonedTimestamp {
        fraction: u32,
    },
    ZonedTime,
    IntervalMicros,
    IntervalString,
    Array(Box<Kind>),
}

impl Kind {
    /// The kind of a column, or `None` for a type Debezium leaves out of its
    /// events (unknown and extension types, arrays of interval or name).
    pub fn of(col: &ColumnMeta, cfg: &DebeziumConfig) -> Option<Kind> {
        if let Some(labels) = &col.enum_labels {
            return Some(Kind::Enum(labels.clone()));
        }
        if let Some(elem) = oid::array_element(col.type_oid) {
            if matches!(elem, oid::INTERVAL | oid::NAME) {
                return None;
            }
            return Kind::scalar(elem, col.type_modifier, cfg).map(|k| Kind::Array(Box::new(k)));
        }
        Kind::scalar(col.type_oid, col.type_modifier, cfg)
    }

    fn scalar(type_oid: u32, typmod: i32, cfg: &DebeziumConfig) -> Option<Kind> {
        // The fractional-second digits of a time type: its modifier, 6 without one.
        let precision = if typmod < 0 { 6 } else { typmod as u32 };
        let mode = cfg.time_precision_mode;
        Some(match type_oid {
            oid::BOOL => Kind::Bool,
            oid::INT2 => Kind::Int16,
            oid::INT4 => Kind::Int32,
            oid::INT8 | OID_OID => Kind::Int64,
            oid::FLOAT4 => Kind::Float32,
            oid::FLOAT8 => Kind::Float64,
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | OID_CHAR | oid::INET | oid::CIDR => Kind::Text,
            t if TEXT_TYPES.contains(&t) => Kind::Text,
            OID_XML => Kind::Xml,
            oid::JSON | oid::JSONB => Kind::Json,
            oid::UUID => Kind::Uuid,
            oid::BYTEA => Kind::Binary(cfg.binary_handling_mode),
            oid::NUMERIC => match cfg.decimal_handling_mode {
                DecimalHandlingMode::Precise if typmod < 0 => Kind::VariableDecimal,
                DecimalHandlingMode::Precise => {
                    let t = (typmod - 4) as u32;
                    Kind::Decimal { precision: (t >> 16) & 0xFFFF, scale: t & 0xFFFF }
                }
                DecimalHandlingMode::String => Kind::DecimalString,
                DecimalHandlingMode::Double => Kind::DecimalDouble,
            },
            oid::DATE => Kind::Date { connect: mode == TimePrecisionMode::Connect },
            oid::TIME => match mode {
                TimePrecisionMode::Connect => Kind::TimeMillis { connect: true },
                TimePrecisionMode::Adaptive if precision <= 3 => Kind::TimeMillis { connect: false },
                _ => Kind::TimeMicros,
            },
            oid::TIMESTAMP => match mode {
                TimePrecisionMode::Connect => Kind::TimestampMillis { connect: true },
                _ if precision <= 3 => Kind::TimestampMillis { connect: false },
                _ => Kind::TimestampMicros,
            },
            oid::TIMESTAMPTZ => Kind::ZonedTimestamp { fraction: precision },
            oid::TIMETZ => Kind::ZonedTime,
            oid::INTERVAL => match cfg.interval_handling_mode {
                IntervalHandlingMode::Numeric => Kind::IntervalMicros,
                IntervalHandlingMode::String => Kind::IntervalString,
            },
            _ => return None,
        })
    }

    /// The Connect schema of the kind as the JSON converter writes it, with
    /// `optional`, and `"field":"<name>"` when it is a struct field.
    pub fn schema_json(&self, optional: bool, field: Option<&str>) -> String {
        self.schema_json_with_default(optional, None, field)
    }

    /// [`Kind::schema_json`] with the field's `"default"` (JSON text).
    pub fn schema_json_with_default(&self, optional: bool, default: Option<&str>, field: Option<&str>) -> String {
        let mut s = self.schema_head(optional);
        if let Some(d) = default {
            s.push_str(",\"default\":");
            s.push_str(d);
        }
        if let Some(f) = field {
            s.push_str(",\"field\":");
            s.push_str(&json_string(f));
        }
        s.push('}');
        s
    }

    /// The schema's object without its closing brace.
    fn schema_head(&self, optional: bool) -> String {
        let named =
            |ty: &str, name: &str| format!(r#"{{"type":"{ty}","optional":{optional},"name":"{name}","version":1"#);
        match self {
            Kind::Bool => format!(r#"{{"type":"boolean","optional":{optional}"#),
            Kind::Int16 => format!(r#"{{"type":"int16","optional":{optional}"#),
            Kind::Int32 => format!(r#"{{"type":"int32","optional":{optional}"#),
            Kind::Int64 => format!(r#"{{"type":"int64","optional":{optional}"#),
            Kind::Float32 => format!(r#"{{"type":"float","optional":{optional}"#),
            Kind::Float64 | Kind::DecimalDouble => format!(r#"{{"type":"double","optional":{optional}"#),
            Kind::Text | Kind::DecimalString => format!(r#"{{"type":"string","optional":{optional}"#),
            Kind::Enum(labels) => format!(
                r#"{{"type":"string","optional":{optional},"name":"io.debezium.data.Enum","version":1,"parameters":{{"allowed":{}}}"#,
                json_string(labels)
            ),
            Kind::Xml => named("string", "io.debezium.data.Xml"),
            Kind::Json => named("string", "io.debezium.data.Json"),
            Kind::Uuid => named("string", "io.debezium.data.Uuid"),
            Kind::Binary(BinaryHandlingMode::Bytes) => format!(r#"{{"type":"bytes","optional":{optional}"#),
            Kind::Binary(_) => format!(r#"{{"type":"string","optional":{optional}"#),
            Kind::Decimal { precision, scale } => format!(
                r#"{{"type":"bytes","optional":{optional},"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{{"scale":"{scale}","connect.decimal.precision":"{precision}"}}"#
            ),
            Kind::VariableDecimal => format!(
                r#"{{"type":"struct","fields":[{{"type":"int32","optional":false,"field":"scale"}},{{"type":"bytes","optional":false,"field":"value"}}],"optional":{optional},"name":"io.debezium.data.VariableScaleDecimal","version":1,"doc":"Variable scaled decimal""#
            ),
            Kind::Date { connect: false } => named("int32", "io.debezium.time.Date"),
            Kind::Date { connect: true } => named("int32", "org.apache.kafka.connect.data.Date"),
            Kind::TimeMillis { connect: false } => named("int32", "io.debezium.time.Time"),
            Kind::TimeMillis { connect: true } => named("int32", "org.apache.kafka.connect.data.Time"),
            Kind::TimeMicros => named("int64", "io.debezium.time.MicroTime"),
            Kind::TimestampMillis { connect: false } => named("int64", "io.debezium.time.Timestamp"),
            Kind::TimestampMillis { connect: true } => named("int64", "org.apache.kafka.connect.data.Timestamp"),
            Kind::TimestampMicros => named("int64", "io.debezium.time.MicroTimestamp"),
            Kind::ZonedTimestamp { .. } => named("string", "io.debezium.time.ZonedTimestamp"),
            Kind::ZonedTime => named("string", "io.debezium.time.ZonedTime"),
            Kind::IntervalMicros => named("int64", "io.debezium.time.MicroDuration"),
            Kind::IntervalString => named("string", "io.debezium.time.Interval"),
            Kind::Array(elem) => {
                format!(r#"{{"type":"array","items":{},"optional":{optional}"#, elem.schema_json(true, None))
            }
        }
    }
}

/// What Debezium writes for a NULL in a NOT NULL column (a non-key column
/// of the old row of a DELETE or key change under DEFAULT identity, which
/// PostgreSQL sends as NULL): the schema's default if it has one, else the
/// converter's fallback, the type's zero.
pub fn fallback_json(kind: &Kind) -> String {
    match kind {
        Kind::Bool => "false".into(),
        Kind::Int16 | Kind::Int32 | Kind::Int64 => "0".into(),
        Kind::Float32 | Kind::Float64 | Kind::DecimalDouble => "0.0".into(),
        Kind::Decimal { .. } => r#""AA==""#.into(),
        Kind::VariableDecimal => r#"{"scale":0,"value":"AA=="}"#.into(),
        Kind::DecimalString => r#""0""#.into(),
        Kind::Date { .. } | Kind::TimeMillis { .. } | Kind::TimeMicros => "0".into(),
        Kind::TimestampMillis { .. } | Kind::TimestampMicros | Kind::IntervalMicros => "0".into(),
        Kind::ZonedTimestamp { .. } => r#""1970-01-01T00:00:00Z""#.into(),
        Kind::ZonedTime => r#""00:00:00Z""#.into(),
        Kind::IntervalString => r#""P0Y0M0DT0H0M0S""#.into(),
        Kind::Array(_) => "[]".into(),
        Kind::Text | Kind::Enum(_) | Kind::Xml | Kind::Json | Kind::Uuid | Kind::Binary(_) => r#""""#.into(),
    }
}

/// The field default Debezium's schema gives a column with a DEFAULT: the
/// literal (`'x'::text`, `42`, `'2020-01-01'::date`) as a value of the
/// column's type, or for a function (`now()`, `nextval(…)`) the type's
/// placeholder (zero, the epoch, empty); `None` where Debezium has none
/// (NULL, types it does not parse defaults of, a struct-valued type).
pub fn default_value(col: &ColumnMeta, kind: &Kind) -> Option<Value> {
    let expr = col.default.as_deref()?;
    let generated = is_function_default(expr);
    let literal = |placeholder: &str| -> Option<String> {
        if generated {
            return Some(placeholder.to_string());
        }
        extract_literal(expr)
    };
    if col.enum_labels.is_some() {
        return Some(Value::Text(extract_literal(expr)?));
    }
    let v = match (col.type_oid, kind) {
        (_, Kind::VariableDecimal | Kind::Array(_)) => return None,
        (oid::BOOL, _) => Value::Bool(literal("false")?.eq_ignore_ascii_case("true")),
        (oid::BPCHAR | oid::VARCHAR | oid::TEXT, _) => Value::Text(literal("")?),
        (oid::JSON | oid::JSONB, _) => Value::Text(literal("{}")?),
        (oid::INT2, _) => Value::Int2(literal("0")?.parse().ok()?),
        (oid::INT4, _) => Value::Int4(literal("0")?.parse().ok()?),
        (oid::INT8, _) => Value::Int8(literal("0")?.parse().ok()?),
        (oid::FLOAT4, _) => Value::Float4(literal("0.0")?.parse().ok()?),
        (oid::FLOAT8, _) => Value::Float8(literal("0.0")?.parse().ok()?),
        (oid::NUMERIC, _) => {
            let text = literal("0.0")?;
            parse_decimal(&text)?;
            Value::Numeric(text)
        }
        (oid::UUID, _) => Value::Uuid(uuid::Uuid::parse_str(&literal("00000000-0000-0000-0000-000000000000")?).ok()?),
        (oid::DATE, _) => Value::from_text(oid::DATE, literal("1970-01-01")?.as_bytes()).ok()?,
        (oid::TIME, _) => match literal("00:00:00")?.as_str() {
            "00:00" => Value::Time(0),
            t => Value::from_text(oid::TIME, t.as_bytes()).ok()?,
        },
        (oid::TIMESTAMP, _) => {
            let t = literal("1970-01-01 00:00:00")?;
            let t = if t.contains(' ') { t } else { format!("{t} 00:00:00") };
            Value::from_text(oid::TIMESTAMP, t.as_bytes()).ok()?
        }
        (oid::TIMESTAMPTZ, _) => {
            let t = literal("1970-01-01 00:00:00+00")?;
            let t = if t.contains(' ') { t } else { format!("{t} 00:00:00+00") };
            Value::from_text(oid::TIMESTAMPTZ, t.as_bytes()).ok()?
        }
        // A function default of an interval is "epoch", which pgjdbc does not read.
        (oid::INTERVAL, _) if !generated => Value::from_text(oid::INTERVAL, extract_literal(expr)?.as_bytes()).ok()?,
        _ => return None,
    };
    Some(v)
}

/// Debezium's test for a generated default: a function call
/// (`^[(]?[A-Za-z0-9_.]+\(…\)`) or one of SQL's current date/time keywords.
fn is_function_default(expr: &str) -> bool {
    let lower = expr.to_ascii_lowercase();
    if ["current_timestamp", "current_time", "current_date", "localtime", "localtimestamp"].contains(&lower.as_str()) {
        return true;
    }
    let body = expr.strip_prefix('(').unwrap_or(expr);
    let name_len = body.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.').count();
    name_len > 0 && body[name_len..].starts_with('(') && body.contains(')')
}

/// The value of a default expression as Debezium extracts it: the text
/// between its first pair of quotes (`''` unescaped), else the expression
/// itself; `None` for `NULL::…`.
fn extract_literal(expr: &str) -> Option<String> {
    let Some(start) = expr.find('\'') else {
        return (!expr.starts_with("NULL::")).then(|| expr.to_string());
    };
    let rest = &expr[start + 1..];
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                chars.next();
                out.push('\'');
            } else {
                return Some(out);
            }
        } else {
            out.push(c);
        }
    }
    None
}

pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_int(out: &mut Vec<u8>, n: i64) {
    let _ = write!(out, "{n}");
}

/// A float as Jackson writes it: a number, or `"NaN"` / `"Infinity"` /
/// `"-Infinity"` as strings.
fn push_f64(out: &mut Vec<u8>, f: f64) {
    if f.is_nan() {
        out.extend_from_slice(b"\"NaN\"");
    } else if f.is_infinite() {
        out.extend_from_slice(if f > 0.0 { b"\"Infinity\"" } else { b"\"-Infinity\"" });
    } else {
        let _ = serde_json::to_writer(&mut *out, &f);
    }
}

fn push_f32(out: &mut Vec<u8>, f: f32) {
    if f.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &f);
    } else {
        push_f64(out, f.into());
    }
}

/// Writes `value` as a column of kind `kind`. A value whose type does not
/// match the kind (which the source never produces) is written in
/// pgfanout's own JSON form rather than lost.
pub fn write_value(out: &mut Vec<u8>, kind: &Kind, value: &Value) {
    if value.is_null() {
        out.extend_from_slice(b"null");
        return;
    }
    match (kind, value) {
        (Kind::Bool, Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        (Kind::Int16 | Kind::Int32 | Kind::Int64, v) if v.as_i64().is_some() => push_int(out, v.as_i64().unwrap_or(0)),
        (Kind::Int64, Value::Unknown { text, .. }) if text.parse::<i64>().is_ok() => {
            out.extend_from_slice(text.as_bytes())
        }
        (Kind::Float32, Value::Float4(f)) => push_f32(out, *f),
        (Kind::Float64, Value::Float8(f)) => push_f64(out, *f),
        (Kind::Text | Kind::Enum(_) | Kind::Xml, Value::Text(s) | Value::Inet(s) | Value::Cidr(s)) => push_str(out, s),
        (Kind::Text | Kind::Enum(_) | Kind::Xml, Value::Unknown { text, .. }) => push_str(out, text),
        // The text PostgreSQL sent, as Debezium passes it on.
        (Kind::Json, Value::Json { text, .. }) => push_str(out, text),
        (Kind::Uuid, Value::Uuid(u)) => push_str(out, u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer())),
        (Kind::Binary(mode), Value::Bytea(b)) => push_str(out, &binary_text(*mode, b)),
        (Kind::Decimal { scale, .. }, Value::Numeric(s)) => match parse_decimal(s) {
            Some(d) => push_str(out, &base64_std(&d.rescaled(*scale).unscaled_bytes())),
            // NaN and ±Infinity have no Decimal form; Debezium stops on them.
            None => out.extend_from_slice(b"null"),
        },
        (Kind::VariableDecimal, Value::Numeric(s)) => match parse_decimal(s) {
            Some(d) => {
                let d = d.stripped();
                let _ = write!(out, "{{\"scale\":{},\"value\":", d.scale);
                push_str(out, &base64_std(&d.unscaled_bytes()));
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        },
        (Kind::DecimalString, Value::Numeric(s)) => push_str(out, s),
        (Kind::DecimalDouble, Value::Numeric(_)) => match value.as_f64() {
            Some(f) => push_f64(out, f),
            None => out.extend_from_slice(b"null"),
        },
        (Kind::Date { .. }, Value::Date(d)) => push_int(out, epoch_days(*d)),
        (Kind::Date { .. }, Value::Infinity { negative, .. }) => {
            push_int(out, if *negative { DATE_NEG_INFINITY_DAYS } else { DATE_INFINITY_DAYS })
        }
        (Kind::TimeMillis { .. }, Value::Time(us)) => push_int(out, us / 1000),
        (Kind::TimeMicros, Value::Time(us)) => push_int(out, *us),
        (Kind::TimestampMillis { .. }, Value::Timestamp(t)) => push_int(out, t.and_utc().timestamp_millis()),
        (Kind::TimestampMicros, Value::Timestamp(t)) => push_int(out, t.and_utc().timestamp_micros()),
        (Kind::TimestampMillis { .. }, Value::Infinity { negative, .. }) => push_int(
            out,
            (if *negative { TIMESTAMP_NEG_INFINITY_MICROS } else { TIMESTAMP_INFINITY_MICROS }).div_euclid(1000),
        ),
        (Kind::TimestampMicros, Value::Infinity { negative, .. }) => {
            push_int(out, if *negative { TIMESTAMP_NEG_INFINITY_MICROS } else { TIMESTAMP_INFINITY_MICROS })
        }
        (Kind::ZonedTimestamp { fraction }, Value::TimestampTz(t)) => write_zoned_timestamp(out, t, *fraction),
        (Kind::ZonedTimestamp { .. }, Value::Infinity { negative, .. }) => {
            push_str(out, if *negative { "-infinity" } else { "infinity" })
        }
        (Kind::ZonedTime, Value::TimeTz { micros, offset_secs }) => push_str(out, &zoned_time(*micros, *offset_secs)),
        (Kind::IntervalMicros, Value::Interval { months, days, micros }) => {
            push_int(out, interval_micros(*months, *days, *micros))
        }
        (Kind::IntervalString, Value::Interval { months, days, micros }) => {
            push_str(out, &interval_iso(*months, *days, *micros))
        }
        (Kind::Array(elem), Value::Array { dims, values, .. }) => write_array(out, elem, dims, values),
        (_, v) => {
            let _ = serde_json::to_writer(&mut *out, v);
        }
    }
}

fn write_array(out: &mut Vec<u8>, elem: &Kind, dims: &[ArrayDim], values: &[Value]) {
    // Nested by the dimensions (Debezium's schema is one-dimensional; a
    // multi-dimensional array is written as nested arrays).
    fn level(out: &mut Vec<u8>, elem: &Kind, dims: &[ArrayDim], values: &mut std::slice::Iter<'_, Value>) {
        out.push(b'[');
        let Some((d, rest)) = dims.split_first() else {
            out.push(b']');
            return;
        };
        for i in 0..d.len {
            if i > 0 {
                out.push(b',');
            }
            if rest.is_empty() {
                write_value(out, elem, values.next().unwrap_or(&Value::Null));
            } else {
                level(out, elem, rest, values);
            }
        }
        out.push(b']');
    }
    level(out, elem, dims, &mut values.iter());
}

/// Writes Debezium's unchanged-TOAST placeholder as a value of `kind`: the
/// placeholder's bytes for bytea in `bytes` mode, a one-element array for
/// text-like arrays, the bytes as numbers for integer and date arrays, the
/// string otherwise.
pub fn write_placeholder(out: &mut Vec<u8>, kind: &Kind, placeholder: &str) {
    match kind {
        Kind::Binary(BinaryHandlingMode::Bytes) => push_str(out, &base64_std(placeholder.as_bytes())),
        Kind::Array(elem) => match **elem {
            Kind::Binary(BinaryHandlingMode::Bytes) => {
                out.push(b'[');
                push_str(out, &base64_std(placeholder.as_bytes()));
                out.push(b']');
            }
            Kind::Int32 | Kind::Int64 | Kind::Date { .. } => {
                out.push(b'[');
                for (i, b) in placeholder.as_bytes().iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    // Java's bytes are signed.
                    push_int(out, i64::from(*b as i8));
                }
                out.push(b']');
            }
            _ => {
                out.push(b'[');
                push_str(out, placeholder);
                out.push(b']');
            }
        },
        _ => push_str(out, placeholder),
    }
}

fn base64_std(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// bytea under `binary.handling.mode`: the JSON converter writes Connect
/// bytes as base64 too.
pub fn binary_text(mode: BinaryHandlingMode, b: &[u8]) -> String {
    match mode {
        BinaryHandlingMode::Bytes | BinaryHandlingMode::Base64 => base64_std(b),
        BinaryHandlingMode::Base64UrlSafe => base64::engine::general_purpose::URL_SAFE.encode(b),
        BinaryHandlingMode::Hex => hex::encode(b),
    }
}

/// A numeric's digits without sign or point, and how many are fractional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    digits: String,
    scale: u32,
}

/// PostgreSQL's numeric text (never with an exponent); `None` for NaN and
/// the infinities.
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Decimal { negative, digits: format!("{int}{frac}"), scale: frac.len() as u32 })
}

impl Decimal {
    /// At `scale` digits after the point, as Java's `setScale` (PostgreSQL
    /// already sends a column's declared scale, so this only pads).
    fn rescaled(mut self, scale: u32) -> Decimal {
        while self.scale < scale {
            self.digits.push('0');
            self.scale += 1;
        }
        while self.scale > scale {
            self.digits.pop();
            self.scale -= 1;
        }
        self
    }

    /// Trailing fractional zeros removed, as Java's `stripTrailingZeros`
    /// followed by Debezium's `setScale(0)` of a negative scale.
    fn stripped(mut self) -> Decimal {
        while self.scale > 0 && self.digits.ends_with('0') {
            self.digits.pop();
            self.scale -= 1;
        }
        self
    }

    /// The unscaled value as Java's `BigInteger.toByteArray`: big-endian
    /// two's complement in the fewest bytes that keep the sign.
    pub fn unscaled_bytes(&self) -> Vec<u8> {
        // Magnitude in base 256, most significant first.
        let mut mag: Vec<u8> = Vec::new();
        for d in self.digits.bytes() {
            let mut carry = u32::from(d - b'0');
            for b in mag.iter_mut().rev() {
                let v = u32::from(*b) * 10 + carry;
                *b = (v & 0xFF) as u8;
                carry = v >> 8;
            }
            while carry > 0 {
                mag.insert(0, (carry & 0xFF) as u8);
                carry >>= 8;
            }
        }
        while mag.first() == Some(&0) {
            mag.remove(0);
        }
        if mag.is_empty() {
            return vec![0];
        }
        if !self.negative {
            if mag[0] & 0x80 != 0 {
                mag.insert(0, 0);
            }
            return mag;
        }
        // Two's complement: invert, add one.
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
        if mag[0] & 0x80 == 0 {
            mag.insert(0, 0xFF);
        }
        // -2^(8k-1) and the like can leave a redundant sign byte.
        while mag.len() > 1 && mag[0] == 0xFF && mag[1] & 0x80 != 0 {
            mag.remove(0);
        }
        mag
    }
}

fn epoch_days(d: NaiveDate) -> i64 {
    i64::from(d.num_days_from_ce()) - 719_163
}

/// `YYYY-MM-DDTHH:MM:SS` as Java's ISO formatter writes the date part
/// (four digits, a sign for years past 9999 or before year 0).
fn iso_date_time(t: &NaiveDateTime) -> String {
    let y = t.year();
    let year = if (0..=9999).contains(&y) {
        format!("{y:04}")
    } else if y > 9999 {
        format!("+{y}")
    } else {
        format!("-{:04}", y.unsigned_abs())
    };
    format!("{year}-{:02}-{:02}T{:02}:{:02}:{:02}", t.month(), t.day(), t.hour(), t.minute(), t.second())
}

/// Nanoseconds as a fraction: `width` digits, or (width 0 or past 9) as
/// many as needed, none for zero.
fn fraction(nanos: u32, width: u32) -> String {
    let digits = format!("{nanos:09}");
    if (1..=9).contains(&width) {
        format!(".{}", &digits[..width as usize])
    } else if nanos == 0 {
        String::new()
    } else {
        format!(".{}", digits.trim_end_matches('0'))
    }
}

/// [`zoned_timestamp`] as a JSON string, written in place (no escaping
/// needed, and this runs for most rows).
fn write_zoned_timestamp(out: &mut Vec<u8>, t: &DateTime<Utc>, width: u32) {
    let n = t.naive_utc();
    let y = n.year();
    if !(0..=9999).contains(&y) || !(1..=9).contains(&width) {
        push_str(out, &zoned_timestamp(t, width));
        return;
    }
    let nanos = n.nanosecond() % 1_000_000_000;
    let _ = write!(out, "\"{y:04}-{:02}-{:02}T{:02}:{:02}:{:02}", n.month(), n.day(), n.hour(), n.minute(), n.second());
    let digits = nanos / 10u32.pow(9 - width);
    let _ = write!(out, ".{digits:0w$}Z\"", w = width as usize);
}

/// `io.debezium.time.ZonedTimestamp`: the instant in UTC with `width`
/// fractional digits (the column's precision, 6 unless declared).
pub fn zoned_timestamp(t: &DateTime<Utc>, width: u32) -> String {
    let naive = t.naive_utc();
    format!("{}{}Z", iso_date_time(&naive), fraction(naive.nanosecond() % 1_000_000_000, width))
}

/// `io.debezium.time.ZonedTime`: the time moved to UTC, `HH:MM:SS[.f]Z`.
pub fn zoned_time(micros: i64, offset_secs: i32) -> String {
    const DAY: i64 = 86_400_000_000;
    let utc = (micros - i64::from(offset_secs) * 1_000_000).rem_euclid(DAY);
    let secs = utc / 1_000_000;
    let nanos = (utc % 1_000_000) as u32 * 1000;
    format!("{:02}:{:02}:{:02}{}Z", secs / 3600, secs / 60 % 60, secs % 60, fraction(nanos, 0))
}

/// An interval split as pgjdbc's `PGInterval` reads PostgreSQL's text:
/// years, months, days, hours, minutes and (fractional) seconds, each
/// carrying the sign of its part.
fn interval_parts(months: i32, days: i32, micros: i64) -> (i32, i32, i32, i64, i64, f64) {
    let hours = micros / 3_600_000_000;
    let minutes = micros % 3_600_000_000 / 60_000_000;
    let rest = micros % 60_000_000;
    let seconds = (rest / 1_000_000) as f64 + (rest % 1_000_000) as f64 / 1e6;
    (months / 12, months % 12, days, hours, minutes, seconds)
}

/// `io.debezium.time.MicroDuration`, computed as Debezium does (in doubles,
/// a month of 365.25 / 12 days, truncated).
pub fn interval_micros(months: i32, days: i32, micros: i64) -> i64 {
    let (y, m, d, h, mi, s) = interval_parts(months, days, micros);
    let number_of_days = f64::from(y * 12 + m) * DAYS_PER_MONTH_AVG + f64::from(d);
    let number_of_seconds = ((number_of_days * 24.0 + h as f64) * 60.0 + mi as f64) * 60.0 + s;
    (number_of_seconds * 1e6) as i64
}

/// `io.debezium.time.Interval`: `PnYnMnDTnHnMnS` with every part written.
pub fn interval_iso(months: i32, days: i32, micros: i64) -> String {
    let (y, m, d, h, mi, s) = interval_parts(months, days, micros);
    // Java's BigDecimal.valueOf(double), trailing zeros stripped, plain.
    let secs = if s == 0.0 { "0".to_string() } else { format!("{s}") };
    format!("P{y}Y{m}M{d}DT{h}H{mi}M{secs}S")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn enc(kind: &Kind, v: &Value) -> String {
        let mut out = Vec::new();
        write_value(&mut out, kind, v);
        String::from_utf8(out).unwrap()
    }

    fn col(type_oid: u32, type_modifier: i32) -> ColumnMeta {
        ColumnMeta { name: "c".into(), type_oid, type_modifier, optional: true, enum_labels: None, default: None }
    }

    fn kind(type_oid: u32, typmod: i32) -> Kind {
        Kind::of(&col(type_oid, typmod), &DebeziumConfig::default()).expect("a kind")
    }

    fn numeric_typmod(precision: i32, scale: i32) -> i32 {
        ((precision << 16) | scale) + 4
    }

    #[test]
    fn decimals_are_unscaled_twos_complement_in_base64() {
        let k = kind(oid::NUMERIC, numeric_typmod(10, 3));
        assert_eq!(k, Kind::Decimal { precision: 10, scale: 3 });
        // 12340 = 0x3034.
        assert_eq!(enc(&k, &Value::Numeric("12.340".into())), r#""MDQ=""#);
        // -12340: two's complement 0xCFCC.
        assert_eq!(enc(&k, &Value::Numeric("-12.340".into())), r#""z8w=""#);
        assert_eq!(enc(&k, &Value::Numeric("0.000".into())), r#""AA==""#);
        // 128 needs a sign byte: 0x0080; -128 does not: 0x80; -129 is 0xFF7F.
        let d = |s: &str| parse_decimal(s).unwrap().unscaled_bytes();
        assert_eq!(d("128"), vec![0x00, 0x80]);
        assert_eq!(d("-128"), vec![0x80]);
        assert_eq!(d("-129"), vec![0xFF, 0x7F]);
        assert_eq!(d("-256"), vec![0xFF, 0x00]);
        assert_eq!(d("-32768"), vec![0x80, 0x00]);
        assert_eq!(d("255"), vec![0x00, 0xFF]);
        // Beyond 64 bits: 2^64 = 0x01 followed by eight zero bytes.
        assert_eq!(d("18446744073709551616"), [vec![1], vec![0; 8]].concat());
        assert_eq!(enc(&k, &Value::Numeric("NaN".into())), "null");
        // Shorter than the declared scale is padded (setScale).
        assert_eq!(enc(&k, &Value::Numeric("12.34".into())), r#""MDQ=""#);
    }

    #[test]
    fn a_numeric_without_scale_is_a_variable_scale_decimal() {
        let k = kind(oid::NUMERIC, -1);
        assert_eq!(k, Kind::VariableDecimal);
        assert_eq!(enc(&k, &Value::Numeric("12.340".into())), r#"{"scale":2,"value":"BNI="}"#);
        assert_eq!(enc(&k, &Value::Numeric("1200".into())), r#"{"scale":0,"value":"BLA="}"#);
        assert_eq!(enc(&k, &Value::Numeric("0.000".into())), r#"{"scale":0,"value":"AA=="}"#);
        let string = DebeziumConfig { decimal_handling_mode: DecimalHandlingMode::String, ..Default::default() };
        let double = DebeziumConfig { decimal_handling_mode: DecimalHandlingMode::Double, ..Default::default() };
        let ks = Kind::of(&col(oid::NUMERIC, -1), &string).unwrap();
        let kd = Kind::of(&col(oid::NUMERIC, numeric_typmod(10, 3)), &double).unwrap();
        assert_eq!(enc(&ks, &Value::Numeric("12.340".into())), r#""12.340""#);
        assert_eq!(enc(&ks, &Value::Numeric("NaN".into())), r#""NaN""#);
        assert_eq!(enc(&kd, &Value::Numeric("12.340".into())), "12.34");
        assert_eq!(enc(&kd, &Value::Numeric("-Infinity".into())), r#""-Infinity""#);
    }

    #[test]
    fn times_follow_time_precision_mode() {
        let ts = |s: &str| Value::Timestamp(NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap());
        let micro = kind(oid::TIMESTAMP, -1);
        assert_eq!(micro, Kind::TimestampMicros);
        assert_eq!(enc(&micro, &ts("2026-11-28 12:00:00.123456")), "1795867200123456");
        assert_eq!(enc(&micro, &ts("1969-12-31 23:59:59.999999")), "-1");
        assert_eq!(kind(oid::TIMESTAMP, 3), Kind::TimestampMillis { connect: false });
        assert_eq!(enc(&kind(oid::TIMESTAMP, 3), &ts("1969-12-31 23:59:59.999")), "-1");
        assert_eq!(kind(oid::TIMESTAMP, 6), Kind::TimestampMicros);
        let inf = |negative| Value::Infinity { oid: oid::TIMESTAMP, negative };
        assert_eq!(enc(&micro, &inf(false)), "9223372036825200000");
        assert_eq!(enc(&micro, &inf(true)), "-9223372036832400000");

        // Dates: days since 1970, negative before.
        let date = kind(oid::DATE, -1);
        assert_eq!(enc(&date, &Value::Date(NaiveDate::from_ymd_opt(1969, 12, 31).unwrap())), "-1");
        assert_eq!(enc(&date, &Value::Date(NaiveDate::from_ymd_opt(1900, 1, 1).unwrap())), "-25567");
        assert_eq!(enc(&date, &Value::Date(NaiveDate::from_ymd_opt(2026, 11, 28).unwrap())), "20785");

        assert_eq!(kind(oid::TIME, -1), Kind::TimeMicros);
        assert_eq!(enc(&kind(oid::TIME, -1), &Value::Time(3_723_000_004)), "3723000004");
        assert_eq!(enc(&kind(oid::TIME, 2), &Value::Time(3_723_450_000)), "3723450");
        let connect = DebeziumConfig { time_precision_mode: TimePrecisionMode::Connect, ..Default::default() };
        let atm =
            DebeziumConfig { time_precision_mode: TimePrecisionMode::AdaptiveTimeMicroseconds, ..Default::default() };
        assert_eq!(Kind::of(&col(oid::TIME, 2), &atm), Some(Kind::TimeMicros));
        assert_eq!(Kind::of(&col(oid::TIMESTAMP, -1), &connect), Some(Kind::TimestampMillis { connect: true }));
        assert_eq!(Kind::of(&col(oid::DATE, -1), &connect), Some(Kind::Date { connect: true }));
        assert!(Kind::of(&col(oid::TIMESTAMP, -1), &connect)
            .unwrap()
            .schema_json(true, None)
            .contains("org.apache.kafka.connect.data.Timestamp"));
    }

    #[test]
    fn zoned_values_are_utc_iso_text() {
        let tz = |s: &str| Value::TimestampTz(DateTime::parse_from_rfc3339(s).unwrap().to_utc());
        let k = kind(oid::TIMESTAMPTZ, -1);
        assert_eq!(enc(&k, &tz("2026-11-28T12:00:00+02:00")), r#""2026-11-28T10:00:00.000000Z""#);
        assert_eq!(enc(&k, &tz("2026-11-28T12:00:00.5Z")), r#""2026-11-28T12:00:00.500000Z""#);
        assert_eq!(enc(&kind(oid::TIMESTAMPTZ, 3), &tz("2026-11-28T12:00:00.5Z")), r#""2026-11-28T12:00:00.500Z""#);
        assert_eq!(enc(&kind(oid::TIMESTAMPTZ, 0), &tz("2026-11-28T12:00:00Z")), r#""2026-11-28T12:00:00Z""#);
        assert_eq!(enc(&k, &Value::Infinity { oid: oid::TIMESTAMPTZ, negative: true }), r#""-infinity""#);
        // The in-place writer is the formatter's text, also past 9999 and before year 0.
        for micros in [0i64, -1, 1_795_867_200_123_456, -62_167_219_200_000_001, 253_402_300_800_000_000, 7_000_001] {
            let t = DateTime::from_timestamp_micros(micros).unwrap();
            for width in [0, 1, 3, 6, 9, 10] {
                let mut out = Vec::new();
                write_zoned_timestamp(&mut out, &t, width);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    json_string(&zoned_timestamp(&t, width)),
                    "{micros} {width}"
                );
            }
        }
        let t = kind(oid::TIMETZ, -1);
        assert_eq!(
            enc(&t, &Value::TimeTz { micros: 4 * 3_600_000_000 + 5 * 60_000_000, offset_secs: 5 * 3600 + 1800 }),
            r#""22:35:00Z""#
        );
        assert_eq!(enc(&t, &Value::TimeTz { micros: 1_500_000, offset_secs: 0 }), r#""00:00:01.5Z""#);
    }

    #[test]
    fn intervals_as_debezium_computes_them() {
        // 1 mon 2 days 3 s: (30.4375 + 2) days and 3 s.
        assert_eq!(interval_micros(1, 2, 3_000_000), 2_802_603_000_000);
        assert_eq!(interval_micros(14, 3, 14_706_500_000), 37_091_106_500_000);
        // In doubles -1.000001 s is -1000000.999… µs, truncated: Debezium's
        // arithmetic loses the microsecond, and so does this.
        assert_eq!(interval_micros(0, 0, -1_000_001), -1_000_000);
        assert_eq!(interval_micros(0, 0, 1), 1);
        assert_eq!(interval_iso(1, 2, 3_000_000), "P0Y1M2DT0H0M3S");
        assert_eq!(interval_iso(14, 3, 14_706_500_000), "P1Y2M3DT4H5M6.5S");
        assert_eq!(interval_iso(-14, 0, -1_000_001), "P-1Y-2M0DT0H0M-1.000001S");
        assert_eq!(interval_iso(0, 0, 0), "P0Y0M0DT0H0M0S");
        let k = kind(oid::INTERVAL, -1);
        assert_eq!(enc(&k, &Value::Interval { months: 1, days: 2, micros: 3_000_000 }), "2802603000000");
    }

    #[test]
    fn strings_json_uuid_and_binary() {
        let jsonb = Value::from_text(oid::JSONB, br#"{"a": "x", "bb": [1.50, null]}"#).unwrap();
        assert_eq!(
            enc(&kind(oid::JSONB, -1), &jsonb),
            r#""{\"a\": \"x\", \"bb\": [1.50, null]}""#,
            "the text as PostgreSQL sent it, 1.50 included"
        );
        let u = uuid::Uuid::parse_str("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11").unwrap();
        assert_eq!(enc(&kind(oid::UUID, -1), &Value::Uuid(u)), r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#);
        let b = Value::Bytea(vec![0, 1, 0xFB, 0xFF]);
        assert_eq!(enc(&kind(oid::BYTEA, -1), &b), r#""AAH7/w==""#);
        assert_eq!(binary_text(BinaryHandlingMode::Base64UrlSafe, &[0, 1, 0xFB, 0xFF]), "AAH7_w==");
        assert_eq!(binary_text(BinaryHandlingMode::Hex, &[0, 1, 0xFB, 0xFF]), "0001fbff");
        assert_eq!(enc(&kind(oid::INET, -1), &Value::Inet("10.1.2.3".into())), r#""10.1.2.3""#);
        assert_eq!(enc(&kind(oid::FLOAT8, -1), &Value::Float8(f64::NAN)), r#""NaN""#);
        assert_eq!(enc(&kind(oid::FLOAT4, -1), &Value::Float4(1.25)), "1.25");
        let mood = ColumnMeta { enum_labels: Some(Arc::from("happy,sad")), ..col(90_000, -1) };
        let k = Kind::of(&mood, &DebeziumConfig::default()).unwrap();
        assert_eq!(enc(&k, &Value::Unknown { oid: 90_000, text: "sad".into() }), r#""sad""#);
        assert_eq!(
            k.schema_json(false, Some("m")),
            r#"{"type":"string","optional":false,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"happy,sad"},"field":"m"}"#
        );
        assert_eq!(
            Kind::of(&col(600, -1), &DebeziumConfig::default()),
            None,
            "point is left out, as Debezium's unknown types"
        );
    }

    #[test]
    fn arrays_and_placeholders() {
        let k = kind(1007, -1);
        let v = Value::Array {
            elem_oid: oid::INT4,
            dims: vec![ArrayDim { len: 3, lower_bound: 1 }],
            values: vec![Value::Int4(1), Value::Null, Value::Int4(3)],
        };
        assert_eq!(enc(&k, &v), "[1,null,3]");
        assert_eq!(enc(&k, &Value::Array { elem_oid: oid::INT4, dims: vec![], values: vec![] }), "[]");
        assert_eq!(
            k.schema_json(true, None),
            r#"{"type":"array","items":{"type":"int32","optional":true},"optional":true}"#
        );
        assert_eq!(Kind::of(&col(1187, -1), &DebeziumConfig::default()), None, "interval[] is left out");
        let p = |k: &Kind| {
            let mut out = Vec::new();
            write_placeholder(&mut out, k, "__x");
            String::from_utf8(out).unwrap()
        };
        assert_eq!(p(&kind(oid::TEXT, -1)), r#""__x""#);
        assert_eq!(p(&kind(oid::BYTEA, -1)), r#""X194""#);
        assert_eq!(p(&kind(1009, -1)), r#"["__x"]"#);
        assert_eq!(p(&kind(1007, -1)), "[95,95,120]");
    }

    #[test]
    fn defaults_as_debezium_parses_them() {
        let d = |type_oid, typmod, expr: &str| {
            let c = ColumnMeta { default: Some(expr.into()), ..col(type_oid, typmod) };
            let k = Kind::of(&c, &DebeziumConfig::default()).unwrap();
            default_value(&c, &k).map(|v| enc(&k, &v))
        };
        assert_eq!(d(oid::INT8, -1, "nextval('t_id_seq'::regclass)").as_deref(), Some("0"));
        assert_eq!(d(oid::INT4, -1, "'-1'::integer").as_deref(), Some("-1"));
        assert_eq!(d(oid::INT4, -1, "42").as_deref(), Some("42"));
        assert_eq!(d(oid::TEXT, -1, "'it''s'::text").as_deref(), Some(r#""it's""#));
        assert_eq!(d(oid::VARCHAR, 44, "NULL::character varying"), None);
        assert_eq!(d(oid::BOOL, -1, "true").as_deref(), Some("true"));
        assert_eq!(d(oid::TIMESTAMPTZ, -1, "now()").as_deref(), Some(r#""1970-01-01T00:00:00.000000Z""#));
        assert_eq!(d(oid::TIMESTAMPTZ, -1, "CURRENT_TIMESTAMP").as_deref(), Some(r#""1970-01-01T00:00:00.000000Z""#));
        assert_eq!(
            d(oid::TIMESTAMP, -1, "'2020-01-02 03:04:05'::timestamp without time zone").as_deref(),
            Some("1577934245000000")
        );
        assert_eq!(d(oid::DATE, -1, "CURRENT_DATE").as_deref(), Some("0"));
        assert_eq!(d(oid::NUMERIC, ((10 << 16) | 2) + 4, "1.5").as_deref(), Some(r#""AJY=""#));
        assert_eq!(d(oid::NUMERIC, -1, "1.5"), None, "a VariableScaleDecimal is a struct: no default");
        assert_eq!(d(oid::UUID, -1, "gen_random_uuid()").as_deref(), Some(r#""00000000-0000-0000-0000-000000000000""#));
        assert_eq!(d(oid::JSONB, -1, "'{}'::jsonb").as_deref(), Some(r#""{}""#));
        assert_eq!(d(oid::INTERVAL, -1, "'1 day'::interval").as_deref(), Some("86400000000"));
        assert_eq!(d(oid::BYTEA, -1, "'\\x00'::bytea"), None, "no default of bytea");
        assert_eq!(fallback_json(&kind(oid::TIMESTAMPTZ, -1)), r#""1970-01-01T00:00:00Z""#);
        assert_eq!(
            kind(oid::INT8, -1).schema_json_with_default(false, Some("0"), Some("id")),
            r#"{"type":"int64","optional":false,"default":0,"field":"id"}"#
        );
    }

    #[test]
    fn schemas_name_the_logical_types() {
        let cases = [
            (
                kind(oid::NUMERIC, numeric_typmod(10, 3)),
                false,
                Some("amount"),
                r#"{"type":"bytes","optional":false,"name":"org.apache.kafka.connect.data.Decimal","version":1,"parameters":{"scale":"3","connect.decimal.precision":"10"},"field":"amount"}"#,
            ),
            (
                kind(oid::NUMERIC, -1),
                true,
                Some("n"),
                r#"{"type":"struct","fields":[{"type":"int32","optional":false,"field":"scale"},{"type":"bytes","optional":false,"field":"value"}],"optional":true,"name":"io.debezium.data.VariableScaleDecimal","version":1,"doc":"Variable scaled decimal","field":"n"}"#,
            ),
            (
                kind(oid::TIMESTAMPTZ, -1),
                true,
                None,
                r#"{"type":"string","optional":true,"name":"io.debezium.time.ZonedTimestamp","version":1}"#,
            ),
            (
                kind(oid::TIMESTAMP, -1),
                true,
                None,
                r#"{"type":"int64","optional":true,"name":"io.debezium.time.MicroTimestamp","version":1}"#,
            ),
            (
                kind(oid::DATE, -1),
                true,
                None,
                r#"{"type":"int32","optional":true,"name":"io.debezium.time.Date","version":1}"#,
            ),
            (
                kind(oid::INTERVAL, -1),
                true,
                None,
                r#"{"type":"int64","optional":true,"name":"io.debezium.time.MicroDuration","version":1}"#,
            ),
            (
                kind(oid::JSONB, -1),
                true,
                None,
                r#"{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1}"#,
            ),
            (
                kind(oid::UUID, -1),
                true,
                None,
                r#"{"type":"string","optional":true,"name":"io.debezium.data.Uuid","version":1}"#,
            ),
            (kind(oid::BYTEA, -1), true, None, r#"{"type":"bytes","optional":true}"#),
            (kind(oid::INT8, -1), false, Some("id"), r#"{"type":"int64","optional":false,"field":"id"}"#),
        ];
        for (k, optional, field, want) in cases {
            assert_eq!(k.schema_json(optional, field), want, "{k:?}");
        }
    }
}
