//! Lists analysts keep at run time (blocked devices, trusted accounts, risky BIN prefixes):
//! values with an optional expiry and a comment, asked by rules through `in_list`.
//!
//! Membership is one hash lookup (a prefix list: one per prefix length of the value), judged
//! at the payment's event time so that two servers fed the same payments and the same changes
//! answer alike, and a backtest asks the list exactly as scoring would. Owned by the
//! [`super::Book`]; changed only under its write lock, all of one request's entries at once.

use std::collections::HashMap;
use std::net::IpAddr;

use rustc_hash::FxHashMap;

/// Most entries one list holds.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Most lists.
pub const MAX_LISTS: usize = 1_000;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;
/// Longest comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 1_024;
/// Longest list name.
pub const MAX_NAME_BYTES: usize = 64;

/// How a list's values are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// Exact match (accounts, merchants, devices, countries, any string).
    String,
    /// IP addresses, matched as addresses ("::ffff:192.0.2.1" is "192.0.2.1").
    Ip,
    /// A value is in the list when one of its prefixes is (BIN ranges, id prefixes).
    Prefix,
}

impl ListKind {
    pub fn name(self) -> &'static str {
        match self {
            ListKind::String => "STRING",
            ListKind::Ip => "IP",
            ListKind::Prefix => "PREFIX",
        }
    }

    pub fn from_name(name: &str) -> Option<ListKind> {
        Some(match name {
            "STRING" => ListKind::String,
            "IP" => ListKind::Ip,
            "PREFIX" => ListKind::Prefix,
            _ => return None,
        })
    }
}

/// One entry's expiry and comment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Event time (seconds since the epoch) from which the entry no longer matches.
    pub expires_at: Option<i64>,
    pub comment: String,
}

impl Entry {
    fn live_at(&self, event_time: i64) -> bool {
        self.expires_at.is_none_or(|t| event_time < t)
    }
}

/// A value as it is stored: strings as given, IP addresses parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Str(Box<str>),
    Ip(IpAddr),
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Str(s) => f.write_str(s),
            Key::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// One list.
#[derive(Debug, Clone)]
pub struct List {
    pub name: String,
    pub kind: ListKind,
    /// Entries of STRING and PREFIX lists (looked up by `&str`, no allocation).
    strs: FxHashMap<Box<str>, Entry>,
    /// Entries of IP lists.
    ips: FxHashMap<IpAddr, Entry>,
}

impl List {
    fn contains(&self, value: &str, event_time: i64) -> bool {
        let live = |e: Option<&Entry>| e.is_some_and(|e| e.live_at(event_time));
        match self.kind {
            ListKind::String => live(self.strs.get(value)),
            ListKind::Ip => value
                .parse()
                .is_ok_and(|ip| live(self.ips.get(&canonical(ip)))),
            ListKind::Prefix => value
                .char_indices()
                .map(|(i, c)| &value[..i + c.len_utf8()])
                .any(|p| live(self.strs.get(p))),
        }
    }

    pub fn len(&self) -> usize {
        self.strs.len() + self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn has(&self, key: &Key) -> bool {
        match key {
            Key::Str(s) => self.strs.contains_key(s),
            Key::Ip(ip) => self.ips.contains_key(ip),
        }
    }

    /// The entries, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = (Key, &Entry)> {
        self.strs
            .iter()
            .map(|(k, e)| (Key::Str(k.clone()), e))
            .chain(self.ips.iter().map(|(k, e)| (Key::Ip(*k), e)))
    }

    fn insert(&mut self, key: Key, entry: Entry) {
        match key {
            Key::Str(s) => {
                self.strs.insert(s, entry);
            }
            Key::Ip(ip) => {
                self.ips.insert(ip, entry);
            }
        }
    }

    fn remove(&mut self, key: &Key) {
        match key {
            Key::Str(s) => {
                self.strs.remove(s);
            }
            Key::Ip(ip) => {
                self.ips.remove(ip);
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every list, by name and by slot (a rule compiles `in_list("name", ..)` to the slot; lists
/// are never removed, so a slot stays valid).
#[derive(Debug, Clone, Default)]
pub struct Lists {
    slots: HashMap<String, usize>,
    lists: Vec<List>,
}

impl Lists {
    pub fn slot(&self, name: &str) -> Option<usize> {
        self.slots.get(name).copied()
    }

    pub fn get(&self, name: &str) -> Option<&List> {
        self.slot(name).map(|s| &self.lists[s])
    }

    pub fn iter(&self) -> impl Iterator<Item = &List> {
        self.lists.iter()
    }

    /// Whether `value` is a live entry of the list in `slot` at `event_time`.
    pub fn contains(&self, slot: usize, value: &str, event_time: i64) -> bool {
        self.lists
            .get(slot)
            .is_some_and(|l| l.contains(value, event_time))
    }

    /// Checks a change and returns it normalised, or says which entry is wrong; nothing is
    /// changed. `kind` is required to create a list and must match an existing one.
    pub fn check_put(
        &self,
        name: &str,
        kind: Option<ListKind>,
        entries: Vec<(String, Entry)>,
    ) -> Result<Change, String> {
        check_name(name)?;
        let existing = self.get(name);
        let kind = match (existing, kind) {
            (Some(l), Some(k)) if l.kind != k => {
                return Err(format!(
                    "kind: list '{name}' holds {} values, not {}",
                    l.kind.name(),
                    k.name()
                ))
            }
            (Some(l), _) => l.kind,
            (None, Some(k)) => k,
            (None, None) => ListKind::String,
        };
        if existing.is_none() && self.lists.len() >= MAX_LISTS {
            return Err(format!(
                "list: there are already {MAX_LISTS} lists, the most allowed"
            ));
        }
        let mut keyed = Vec::with_capacity(entries.len());
        for (i, (value, entry)) in entries.into_iter().enumerate() {
            let key = key_of(kind, &value).map_err(|e| format!("entries[{i}].value: {e}"))?;
            if entry.comment.len() > MAX_COMMENT_BYTES {
                return Err(format!(
                    "entries[{i}].comment: {} bytes, above the limit of {MAX_COMMENT_BYTES}",
                    entry.comment.len()
                ));
            }
            keyed.push((key, entry));
        }
        let before = existing.map_or(0, List::len);
        let new = keyed
            .iter()
            .filter(|(k, _)| existing.is_none_or(|l| !l.has(k)))
            .map(|(k, _)| k)
            .collect::<std::collections::HashSet<_>>()
            .len();
        if before + new > MAX_ENTRIES {
            return Err(format!(
                "entries: list '{name}' would hold {} entries, above the limit of {MAX_ENTRIES}",
                before + new
            ));
        }
        Ok(Change::Put {
            list: name.to_owned(),
            kind,
            entries: keyed,
        })
    }

    /// Checks a removal: the list must exist; values are normalised as the list's kind.
    pub fn check_delete(&self, name: &str, values: &[String]) -> Result<Change, String> {
        let list = self
            .get(name)
            .ok_or_else(|| format!("list: there is no list '{name}'"))?;
        let keys = values
            .iter()
            .enumerate()
            .map(|(i, v)| key_of(list.kind, v).map_err(|e| format!("values[{i}]: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Change::Delete {
            list: name.to_owned(),
            keys,
        })
    }

    /// Applies a checked change (all of it).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Put {
                list,
                kind,
                entries,
            } => {
                let slot = match self.slots.get(&list) {
                    Some(&s) => s,
                    None => {
                        self.lists.push(List {
                            name: list.clone(),
                            kind,
                            strs: FxHashMap::default(),
                            ips: FxHashMap::default(),
                        });
                        self.slots.insert(list, self.lists.len() - 1);
                        self.lists.len() - 1
                    }
                };
                for (key, entry) in entries {
                    self.lists[slot].insert(key, entry);
                }
            }
            Change::Delete { list, keys } => {
                if let Some(&slot) = self.slots.get(&list) {
                    for k in &keys {
                        self.lists[slot].remove(k);
                    }
                }
            }
        }
    }
}

/// A checked change to the lists.
#[derive(Debug, Clone)]
pub enum Change {
    Put {
        list: String,
        kind: ListKind,
        entries: Vec<(Key, Entry)>,
    },
    Delete {
        list: String,
        keys: Vec<Key>,
    },
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_BYTES
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "list: {name:?} is not a list name (1 to {MAX_NAME_BYTES} of A-Z a-z 0-9 _ - .)"
        ));
    }
    Ok(())
}

/// The stored key of `value` in a list of `kind`.
pub fn key_of(kind: ListKind, value: &str) -> Result<Key, String> {
    if value.is_empty() {
        return Err("is empty".into());
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "{} bytes, above the limit of {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(match kind {
        ListKind::Ip => Key::Ip(canonical(
            value
                .parse()
                .map_err(|_| format!("{value:?} is not an IP address"))?,
        )),
        ListKind::String | ListKind::Prefix => Key::Str(value.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(expires_at: Option<i64>) -> Entry {
        Entry {
            expires_at,
            comment: String::new(),
        }
    }

    #[test]
    fn membership_by_kind_and_event_time() {
        let mut lists = Lists::default();
        let put = |lists: &mut Lists, name, kind, values: &[(&str, Option<i64>)]| {
            let entries = values
                .iter()
                .map(|(v, e)| (v.to_string(), entry(*e)))
                .collect();
            let change = lists.check_put(name, Some(kind), entries).expect("valid");
            lists.apply(change);
        };
        put(
            &mut lists,
            "devices",
            ListKind::String,
            &[("d1", None), ("d2", Some(100))],
        );
        put(
            &mut lists,
            "ips",
            ListKind::Ip,
            &[("::ffff:192.0.2.1", None)],
        );
        put(&mut lists, "bins", ListKind::Prefix, &[("4111", None)]);
        let (d, i, b) = (
            lists.slot("devices").expect("slot"),
            lists.slot("ips").expect("slot"),
            lists.slot("bins").expect("slot"),
        );
        assert!(lists.contains(d, "d1", 0));
        assert!(lists.contains(d, "d2", 99) && !lists.contains(d, "d2", 100));
        assert!(!lists.contains(d, "d3", 0));
        assert!(lists.contains(i, "192.0.2.1", 0) && !lists.contains(i, "not-an-ip", 0));
        assert!(lists.contains(b, "41111111", 0) && !lists.contains(b, "4000", 0));
        let change = lists
            .check_delete("devices", &["d1".into()])
            .expect("valid");
        lists.apply(change);
        assert!(!lists.contains(d, "d1", 0));
    }

    #[test]
    fn a_bad_entry_refuses_the_whole_change() {
        let lists = Lists::default();
        let err = lists
            .check_put(
                "ips",
                Some(ListKind::Ip),
                vec![
                    ("192.0.2.1".into(), entry(None)),
                    ("nope".into(), entry(None)),
                ],
            )
            .unwrap_err();
        assert!(err.starts_with("entries[1].value"), "{err}");
        assert!(lists.check_put("bad name", None, vec![]).is_err());
        assert!(lists.check_delete("missing", &[]).is_err());
    }
}
