//! kombu's JSON envelope: how a message is stored by key-value transports.
//!
//! kombu's virtual transports (Redis among them) store each message as one JSON document:
//! `{"body": <base64>, "content-encoding", "content-type", "headers", "properties":
//! {"correlation_id", "reply_to", "delivery_mode", ["expiration",] "delivery_info": {"exchange",
//! "routing_key"}, "priority", "body_encoding": "base64", "delivery_tag"}}`, in that key order,
//! written as Python's `json.dumps` writes it.
//! celeriac's embedded SQLite broker stores the same document, so a message moves between
//! transports (and to and from Python) without translation.

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ProtocolError;
use crate::protocol::{Message, Properties};

/// Encode a message as kombu's JSON envelope, with kombu's key order (`expiration` only when
/// set, between `delivery_mode` and `delivery_info`). Serialized straight from borrowed parts:
/// no copy of the headers, and their numbers written as they are.
pub fn encode(message: &Message, exchange: &str, routing_key: &str, delivery_tag: &str) -> Vec<u8> {
    let p = &message.properties;
    let envelope = Envelope {
        body: base64::engine::general_purpose::STANDARD.encode(&message.body),
        content_encoding: &p.content_encoding,
        content_type: &p.content_type,
        headers: &message.headers,
        properties: EnvelopeProperties {
            correlation_id: p.correlation_id.as_deref(),
            reply_to: p.reply_to.as_deref(),
            delivery_mode: p.delivery_mode,
            expiration: p.expiration.as_deref(),
            delivery_info: DeliveryInfo { exchange, routing_key },
            priority: p.priority.unwrap_or(0),
            body_encoding: "base64",
            delivery_tag,
        },
    };
    // Strings, small integers and a map of JSON values always serialize.
    crate::pyjson::to_vec(&envelope).unwrap_or_default()
}

/// The envelope's fields in kombu's order.
#[derive(Serialize)]
struct Envelope<'a> {
    body: String,
    #[serde(rename = "content-encoding")]
    content_encoding: &'a str,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    headers: &'a Map<String, Value>,
    properties: EnvelopeProperties<'a>,
}

#[derive(Serialize)]
struct EnvelopeProperties<'a> {
    correlation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    delivery_mode: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    expiration: Option<&'a str>,
    delivery_info: DeliveryInfo<'a>,
    priority: u8,
    body_encoding: &'static str,
    delivery_tag: &'a str,
}

#[derive(Serialize)]
struct DeliveryInfo<'a> {
    exchange: &'a str,
    routing_key: &'a str,
}

/// Decode kombu's JSON envelope into a message.
pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
    let value =
        crate::pyjson::from_slice(bytes).map_err(|e| ProtocolError::MalformedEnvelope(format!("not JSON: {e}")))?;
    let Value::Object(mut env) = value else {
        return Err(ProtocolError::MalformedEnvelope("not a JSON object".into()));
    };
    let props = match env.remove("properties") {
        Some(Value::Object(p)) => p,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(ProtocolError::MalformedEnvelope("properties is not an object".into())),
    };
    let headers = match env.remove("headers") {
        Some(Value::Object(h)) => h,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(ProtocolError::MalformedEnvelope("headers is not an object".into())),
    };
    let body_encoding = props.get("body_encoding").and_then(Value::as_str).unwrap_or("base64");
    let body = match env.get("body") {
        Some(Value::String(s)) if body_encoding == "base64" => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| ProtocolError::MalformedEnvelope(format!("body is not base64: {e}")))?,
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => return Err(ProtocolError::MalformedEnvelope("no body".into())),
    };
    let str_field = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let properties = Properties {
        correlation_id: str_field(&props, "correlation_id"),
        content_type: str_field(&env, "content-type").unwrap_or_else(|| crate::protocol::CONTENT_TYPE_JSON.into()),
        content_encoding: str_field(&env, "content-encoding").unwrap_or_else(|| "utf-8".into()),
        delivery_mode: props.get("delivery_mode").and_then(Value::as_u64).unwrap_or(2) as u8,
        priority: props.get("priority").and_then(Value::as_u64).map(|p| p.min(255) as u8),
        reply_to: str_field(&props, "reply_to").filter(|s| !s.is_empty()),
        expiration: match props.get("expiration") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        },
    };
    Ok(Message { headers, properties, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{TaskBody, TaskHeaders};

    #[test]
    fn envelope_round_trips() {
        let h = TaskHeaders::new("celeriac.add", "abc");
        let mut m = Message::new_task(&h, &TaskBody::default(), Some(3), None).unwrap();
        let bytes = encode(&m, "", "celery", "tag-1");
        assert_eq!(decode(&bytes).unwrap(), m);
        m.properties.expiration = Some("60000".into());
        let bytes = encode(&m, "", "celery", "tag-1");
        assert!(
            String::from_utf8_lossy(&bytes).contains(r#""delivery_mode": 2, "expiration": "60000", "delivery_info""#)
        );
        assert_eq!(decode(&bytes).unwrap(), m);
        // Headers holding Python's numbers go through unchanged.
        m.headers
            .insert("stamps".into(), crate::pyjson::from_str(r#"{"n": [NaN, 18446744073709551617, 1e+16]}"#).unwrap());
        let bytes = encode(&m, "", "celery", "tag-1");
        assert!(String::from_utf8_lossy(&bytes).contains(r#""stamps": {"n": [NaN, 18446744073709551617, 1e+16]}"#));
        assert_eq!(decode(&bytes).unwrap().headers, m.headers);
    }

    #[test]
    fn broken_envelopes_are_named() {
        assert!(matches!(decode(b"[1]"), Err(ProtocolError::MalformedEnvelope(_))));
        assert!(matches!(decode(br#"{"body": "%%%"}"#), Err(ProtocolError::MalformedEnvelope(_))));
    }
}
