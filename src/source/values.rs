//! Typed column values from pgoutput's text (and binary) forms. Interim:
//! the types the seed tables use; unknown types travel as text with their OID.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::Value as Json;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float8(f64),
    Text(String),
    Uuid(Uuid),
    TimestampTz(DateTime<Utc>),
    Timestamp(NaiveDateTime),
    Json(Json),
    Unknown { oid: u32, text: String },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot read {text:?} as type OID {oid}: {reason}")]
pub struct ValueError {
    pub oid: u32,
    pub text: String,
    pub reason: String,
}

impl Value {
    pub fn from_text(oid: u32, raw: &[u8]) -> Result<Value, ValueError> {
        let text = std::str::from_utf8(raw)
            .map_err(|_| ValueError { oid, text: String::from_utf8_lossy(raw).into(), reason: "invalid UTF-8".into() })?;
        let err = |reason: String| ValueError { oid, text: text.to_string(), reason };
        Ok(match oid {
            16 => Value::Bool(text == "t"),
            21 => Value::Int2(text.parse().map_err(|e| err(format!("{e}")))?),
            23 => Value::Int4(text.parse().map_err(|e| err(format!("{e}")))?),
            20 => Value::Int8(text.parse().map_err(|e| err(format!("{e}")))?),
            700 | 701 => Value::Float8(text.parse().map_err(|e| err(format!("{e}")))?),
            25 | 1043 | 1042 | 19 => Value::Text(text.to_string()),
            2950 => Value::Uuid(text.parse().map_err(|e| err(format!("{e}")))?),
            114 | 3802 => Value::Json(serde_json::from_str(text).map_err(|e| err(format!("{e}")))?),
            1184 => Value::TimestampTz(
                DateTime::parse_from_str(&normalize_tz(text), "%Y-%m-%d %H:%M:%S%.f%z")
                    .map_err(|e| err(format!("{e}")))?
                    .with_timezone(&Utc),
            ),
            1114 => Value::Timestamp(
                NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").map_err(|e| err(format!("{e}")))?,
            ),
            _ => Value::Unknown { oid, text: text.to_string() },
        })
    }

    pub fn from_binary(oid: u32, raw: &[u8]) -> Result<Value, ValueError> {
        Ok(Value::Unknown { oid, text: raw.iter().map(|b| format!("{b:02x}")).collect() })
    }

    pub fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int2(i) => Json::from(*i),
            Value::Int4(i) => Json::from(*i),
            Value::Int8(i) => Json::from(*i),
            Value::Float8(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::String(f.to_string())),
            Value::Text(s) => Json::String(s.clone()),
            Value::Uuid(u) => Json::String(u.to_string()),
            Value::TimestampTz(t) => Json::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            Value::Timestamp(t) => Json::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            Value::Json(j) => j.clone(),
            Value::Unknown { text, .. } => Json::String(text.clone()),
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int2(i) => Some((*i).into()),
            Value::Int4(i) => Some((*i).into()),
            Value::Int8(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float8(f) => Some(*f),
            other => other.as_i64().map(|i| i as f64),
        }
    }

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

    pub fn as_timestamp_millis(&self) -> Option<i64> {
        match self {
            Value::TimestampTz(t) => Some(t.timestamp_millis()),
            Value::Timestamp(t) => Some(t.and_utc().timestamp_millis()),
            _ => None,
        }
    }
}

/// PostgreSQL prints offsets as `+00` or `+05:30`; chrono's %z wants `+0000`.
fn normalize_tz(s: &str) -> String {
    match s.rfind(['+', '-']) {
        Some(i) if i >= 19 => {
            let (head, tz) = s.split_at(i);
            let digits: String = tz[1..].chars().filter(|c| c.is_ascii_digit()).collect();
            format!("{head}{}{:0<4}", &tz[..1], digits)
        }
        _ => s.to_string(),
    }
}
