//! A JSON value that borrows its strings from the bytes it was parsed from.
//!
//! The index reads every stored event once and keeps only a few dozen short terms of it.
//! Parsing into a `serde_json::Value` allocates a `String` for every key and string and a
//! `BTreeMap` for every object, which made it the largest single cost of indexing. A [`Json`]
//! allocates only its arrays and objects (as vectors, searched linearly: audit events have
//! small objects) and an owned string only where the input has an escape.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;

/// A parsed JSON value; objects keep their members in input order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

static NULL: Json<'static> = Json::Null;

impl<'a> Json<'a> {
    /// Parses `bytes`, borrowing every string without an escape.
    pub fn parse(bytes: &'a [u8]) -> serde_json::Result<Json<'a>> {
        serde_json::from_slice(bytes)
    }

    /// The member `key` of an object (the last, if the input repeats it, as in `serde_json`).
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The member `key`, or `null`.
    pub fn at(&self, key: &str) -> &Json<'a> {
        self.get(key).unwrap_or(&NULL)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Number(n) => n.as_u64(),
            _ => None,
        }
    }

    /// The elements of an array; empty for anything else.
    pub fn elements(&self) -> &[Json<'a>] {
        match self {
            Json::Array(a) => a,
            _ => &[],
        }
    }

    /// The members of an object; empty for anything else.
    pub fn members(&self) -> &[(Cow<'a, str>, Json<'a>)] {
        match self {
            Json::Object(m) => m,
            _ => &[],
        }
    }

    /// The same value as a `serde_json::Value` (for code written against that type).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Object(m) => {
                let mut map = serde_json::Map::new();
                for (k, v) in m {
                    // As `serde_json` does: the last of repeated keys wins.
                    map.insert(k.to_string(), v.to_value());
                }
                Value::Object(map)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(b))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(n.into()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Json<'de>, E> {
        // JSON has no NaN or infinity, so a parsed float always converts.
        Ok(serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(s.to_string())))
    }

    fn visit_string<E>(self, s: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((k, v)) = map.next_entry::<Key<'de>, Json<'de>>()? {
            out.push((k.0, v));
        }
        Ok(Json::Object(out))
    }
}

/// An object key, borrowed where the input allows.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn borrows_plain_strings_and_owns_escaped_ones() {
        let bytes = br#"{"a":"plain","b\"":"esc\u00e9","n":[1,-2,3.5,null,true]}"#;
        let v = Json::parse(bytes).unwrap();
        assert!(matches!(v.at("a"), Json::String(Cow::Borrowed("plain"))));
        assert!(matches!(v.at("b\""), Json::String(Cow::Owned(s)) if s == "escé"));
        assert_eq!(v.at("n").elements().len(), 5);
        assert_eq!(v.at("n").elements()[0].as_u64(), Some(1));
        assert_eq!(v.at("missing"), &Json::Null);
        assert_eq!(v.at("a").at("x").elements(), &[]);
    }

    #[test]
    fn converts_to_the_value_serde_json_parses() {
        let bytes = br#"{"z":1,"a":{"b":[{"c":"d"},2.25,-7,false,null]},"e":"\n","a2":{},"x":[]}"#;
        let expected: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(Json::parse(bytes).unwrap().to_value(), expected);
        assert_eq!(expected["a"]["b"][0], json!({"c": "d"}));
    }

    #[test]
    fn rejects_what_serde_json_rejects() {
        for bad in [&b"{"[..], b"{\"a\":}", b"[1,]", b"\"\\x\"", b"{\"a\":1}x", b"\xff"] {
            assert!(Json::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
