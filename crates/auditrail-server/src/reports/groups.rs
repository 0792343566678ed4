//! A report's groups: events counted per combination of a few values (user, organisation,
//! purpose of use, ...), tallied while the events stream by. Memory is bounded by
//! [`GROUPS_MAX`], whatever the number of events.

use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// Most distinct groups a report keeps; events of further groups are tallied together in one
/// group marked `"other": true`, so a report over millions of events still holds a few MiB.
pub const GROUPS_MAX: usize = 10_000;

#[derive(Debug, Default, Clone, PartialEq)]
struct Tally {
    events: u64,
    disclosures: u64,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
}

impl Tally {
    fn add(&mut self, disclosure: bool, occurred_ms: Option<i64>) {
        self.events += 1;
        self.disclosures += u64::from(disclosure);
        if let Some(t) = occurred_ms {
            self.first_ms = Some(self.first_ms.map_or(t, |f| f.min(t)));
            self.last_ms = Some(self.last_ms.map_or(t, |l| l.max(t)));
        }
    }

    fn write(&self, with_disclosures: bool, out: &mut Map<String, Value>) {
        out.insert("events".into(), self.events.into());
        if with_disclosures {
            out.insert("disclosures".into(), self.disclosures.into());
        }
        let time = |ms: Option<i64>| ms.map(auditrail_core::time::format_millis);
        out.insert("first_occurred_at".into(), json!(time(self.first_ms)));
        out.insert("last_occurred_at".into(), json!(time(self.last_ms)));
    }
}

/// Events counted per combination of the values named by `dims`.
#[derive(Debug)]
pub struct Groups {
    dims: &'static [&'static str],
    /// Count disclosures too (the reports that classify them).
    with_disclosures: bool,
    map: HashMap<Vec<Option<String>>, Tally>,
    other: Tally,
    total: Tally,
}

impl Groups {
    pub fn new(dims: &'static [&'static str], with_disclosures: bool) -> Groups {
        Groups {
            dims,
            with_disclosures,
            map: HashMap::new(),
            other: Tally::default(),
            total: Tally::default(),
        }
    }

    /// Counts one event; `key` holds one value per dimension, in order.
    pub fn add(&mut self, key: Vec<Option<String>>, disclosure: bool, occurred_ms: Option<i64>) {
        assert_eq!(key.len(), self.dims.len(), "one value per dimension");
        self.total.add(disclosure, occurred_ms);
        if let Some(t) = self.map.get_mut(&key) {
            t.add(disclosure, occurred_ms);
        } else if self.map.len() < GROUPS_MAX {
            self.map.entry(key).or_default().add(disclosure, occurred_ms);
        } else {
            self.other.add(disclosure, occurred_ms);
        }
    }

    pub fn events(&self) -> u64 {
        self.total.events
    }

    pub fn disclosures(&self) -> u64 {
        self.total.disclosures
    }

    /// The groups, largest first (ties in the order of their values), then the `other` group
    /// if any events went to it.
    pub fn groups_json(&self) -> Value {
        let mut entries: Vec<(&Vec<Option<String>>, &Tally)> = self.map.iter().collect();
        entries.sort_by(|a, b| b.1.events.cmp(&a.1.events).then_with(|| a.0.cmp(b.0)));
        let mut out: Vec<Value> = entries
            .into_iter()
            .map(|(key, tally)| {
                let mut g = Map::new();
                for (dim, v) in self.dims.iter().zip(key) {
                    g.insert((*dim).into(), json!(v));
                }
                tally.write(self.with_disclosures, &mut g);
                Value::Object(g)
            })
            .collect();
        if self.other.events > 0 {
            let mut g = Map::new();
            g.insert("other".into(), true.into());
            self.other.write(self.with_disclosures, &mut g);
            out.push(Value::Object(g));
        }
        Value::Array(out)
    }

    /// `{"events", "disclosures"?, "groups", "first_occurred_at", "last_occurred_at"}`.
    pub fn totals_json(&self) -> Value {
        let mut t = Map::new();
        self.total.write(self.with_disclosures, &mut t);
        t.insert("groups".into(), (self.map.len() + usize::from(self.other.events > 0)).into());
        Value::Object(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, purpose: Option<&str>) -> Vec<Option<String>> {
        vec![Some(user.to_string()), purpose.map(str::to_string)]
    }

    #[test]
    fn events_are_counted_per_combination_largest_first() {
        let mut g = Groups::new(&["user", "purpose_of_use"], true);
        g.add(key("b", Some("TREAT")), false, Some(2_000));
        g.add(key("a", Some("HRESCH")), true, Some(5_000));
        g.add(key("b", Some("TREAT")), false, Some(1_000));
        g.add(key("a", None), false, None);
        assert_eq!((g.events(), g.disclosures()), (4, 1));
        let groups = g.groups_json();
        assert_eq!(
            groups,
            json!([
                {"user": "b", "purpose_of_use": "TREAT", "events": 2, "disclosures": 0,
                 "first_occurred_at": "1970-01-01T00:00:01.000Z", "last_occurred_at": "1970-01-01T00:00:02.000Z"},
                {"user": "a", "purpose_of_use": null, "events": 1, "disclosures": 0,
                 "first_occurred_at": null, "last_occurred_at": null},
                {"user": "a", "purpose_of_use": "HRESCH", "events": 1, "disclosures": 1,
                 "first_occurred_at": "1970-01-01T00:00:05.000Z", "last_occurred_at": "1970-01-01T00:00:05.000Z"},
            ])
        );
        assert_eq!(g.totals_json()["groups"], 3);
        assert_eq!(g.totals_json()["first_occurred_at"], "1970-01-01T00:00:01.000Z");
    }

    #[test]
    fn groups_beyond_the_limit_are_tallied_as_other() {
        let mut g = Groups::new(&["user"], false);
        for i in 0..GROUPS_MAX + 5 {
            g.add(vec![Some(format!("u{i}"))], false, None);
        }
        g.add(vec![Some("u0".into())], false, None);
        let groups = g.groups_json();
        let groups = groups.as_array().unwrap();
        assert_eq!(groups.len(), GROUPS_MAX + 1);
        assert_eq!(groups[0]["user"], "u0");
        assert_eq!(groups[0]["events"], 2);
        assert_eq!(groups.last().unwrap()["other"], true);
        assert_eq!(groups.last().unwrap()["events"], 5);
        assert!(groups[0].get("disclosures").is_none());
        assert_eq!(g.events(), GROUPS_MAX as u64 + 6);
    }
}
