//! A webhook batch without I/O: its body, its Standard Webhooks signature,
//! and the class of a response that is not a success (with its
//! `Retry-After`).

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use sha2::Sha256;

use crate::enrich::EngagementChange;
use crate::retry::ErrorClass;
use crate::sinks::change_id;
use crate::source::Position;

/// The longest `Retry-After` honoured: a receiver asking for more (or a
/// date far ahead) would hold the slot, and with it the WAL, for that long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The Standard Webhooks signature of a message.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A batch as posted: `{"idempotency_key": …, "events": [EventJson…]}`,
/// from the events' shared JSON text.
fn body(key: &str, events: &[&str]) -> Vec<u8> {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + key.len() + 40);
    body.extend_from_slice(b"{\"idempotency_key\":");
    serde_json::to_writer(&mut body, key).expect("a string serializes");
    body.extend_from_slice(b",\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e.as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

/// A batch ready to post.
pub(super) struct Outgoing {
    pub(super) key: String,
    pub(super) body: Vec<u8>,
    pub(super) first: Position,
    pub(super) last: Position,
}

impl Outgoing {
    /// The batch of these events (None if there are none).
    pub(super) fn of<'a>(events: impl Iterator<Item = (&'a EngagementChange, &'a String)>) -> Option<Outgoing> {
        let mut ends: Option<(&EngagementChange, &EngagementChange)> = None;
        let mut json = Vec::new();
        for (c, j) in events {
            ends = Some((ends.map_or(c, |(f, _)| f), c));
            json.push(j.as_str());
        }
        let (first, last) = ends?;
        let key = format!("{}-{}", change_id(first), change_id(last));
        Some(Outgoing { body: body(&key, &json), key, first: first.position, last: last.position })
    }
}

/// The class of a non-success response. 408 (timeout), 409 (a receiver
/// still processing the same key) and 429 are the 4xx that a retry can
/// cure; a redirect is not followed (the signature covers the configured
/// URL) and needs the configuration fixed, as other 4xx need the receiver
/// or the secret fixed. 5xx and anything unexpected: transient.
/// A `Retry-After` on 429 and 503 makes it `TransientAfter`.
pub(super) fn classify(status: StatusCode, retry_after: Option<&str>, now: SystemTime) -> ErrorClass {
    let transient = |after: Option<Duration>| after.map_or(ErrorClass::Transient, ErrorClass::TransientAfter);
    match status.as_u16() {
        429 | 503 => transient(retry_after.and_then(|v| parse_retry_after(v, now))),
        408 | 409 => ErrorClass::Transient,
        300..=499 => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP date
/// (any of the three formats) from which the delay is counted from `now`;
/// a date in the past means now. None for anything else.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds still means "a very long time".
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HttpConfig, Secret};

    #[test]
    fn body_is_the_batch_json() {
        let events = [r#"{"id":"0/1"}"#, r#"{"id":"0/2"}"#];
        let v: serde_json::Value = serde_json::from_slice(&body("a\"b", &events)).unwrap();
        assert_eq!(v, serde_json::json!({ "idempotency_key": "a\"b", "events": [{ "id": "0/1" }, { "id": "0/2" }] }));
        let empty: serde_json::Value = serde_json::from_slice(&body("k", &[])).unwrap();
        assert_eq!(empty["events"], serde_json::json!([]));
    }

    #[test]
    fn standard_webhooks_signature() {
        // Test vector from the Standard Webhooks specification, with the
        // secret as configured (`whsec_` + base64 of the key).
        let cfg = HttpConfig::new("", Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()));
        let sig =
            sign(&cfg.signing_key().unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn statuses_are_transient_or_permanent() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |code: u16, retry_after: Option<&str>| classify(StatusCode::from_u16(code).unwrap(), retry_after, now);
        for code in [500, 502, 503, 504, 599, 408, 409, 429] {
            assert_eq!(v(code, None), ErrorClass::Transient, "{code}");
        }
        for code in [300, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 410, 413, 415, 422, 451, 499] {
            assert_eq!(v(code, Some("5")), ErrorClass::Permanent, "{code}");
        }
        assert_eq!(v(429, Some("7")), ErrorClass::TransientAfter(Duration::from_secs(7)));
        assert_eq!(v(503, Some("120")), ErrorClass::TransientAfter(Duration::from_secs(120)));
        // Honoured on 429 and 503 only.
        assert_eq!(v(500, Some("7")), ErrorClass::Transient);
        assert_eq!(v(408, Some("7")), ErrorClass::Transient);
        assert_eq!(v(429, Some("soon")), ErrorClass::Transient);
    }

    #[test]
    fn retry_after_seconds_or_http_date() {
        // 2023-11-14T22:13:20Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let p = |s| parse_retry_after(s, now);
        assert_eq!(p("0"), Some(Duration::ZERO));
        assert_eq!(p(" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(p("99999999999999999999999"), Some(Duration::from_secs(u64::MAX)));
        // The three date formats of RFC 9110, 90 s after `now`.
        for date in ["Tue, 14 Nov 2023 22:14:50 GMT", "Tuesday, 14-Nov-23 22:14:50 GMT", "Tue Nov 14 22:14:50 2023"] {
            assert_eq!(p(date), Some(Duration::from_secs(90)), "{date}");
        }
        assert_eq!(p("Tue, 14 Nov 2023 22:00:00 GMT"), Some(Duration::ZERO), "a past date means now");
        for bad in ["", "-5", "1.5", "5s", "tomorrow", "Tue, 14 Nov 2023 25:00:00 GMT"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }
}
