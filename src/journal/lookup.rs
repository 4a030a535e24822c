//! The journal's lookup index: which decisions (by sequence number) a transaction id, an
//! account, a merchant, a device or an IP address has, newest first.
//!
//! Why it is not a SQLite index: those keys arrive in no order (UUIDs, account numbers,
//! addresses), so a B-tree index on each dirties a page of its own for nearly every decision
//! once the journal outgrows memory, and SQLite writes each dirty page twice (WAL, then
//! checkpoint). Five such indexes cost the writer ~40-60 us per decision on a journal of a few
//! hundred thousand rows (`cargo bench --bench journal`), rising as it grows. An LSM tree
//! (fjall) appends the keys in batches and sorts them in the background, so the cost stays
//! around a microsecond whatever the journal's size.
//!
//! Keys are `kind ‖ value ‖ 0xFF ‖ seq (big-endian)`, values empty. UTF-8 never contains the
//! byte 0xFF, so a value is never a prefix of another value's keys.
//!
//! Architecture Invariant: the index is derived from the `decisions` table and may trail it
//! (it is written after each commit, and not fsynced), never lead it by a row that reads as
//! another transaction's: readers fetch the rows by `seq` *and* the looked-up column, so a
//! key left by a decision that was lost in a crash (its seq reused) finds nothing. At open,
//! rows past the index's recorded high-water mark are indexed again from SQLite.
//!
//! Shared: one `Lookup` per journal, cloned into the writer thread (which alone writes it)
//! and the readers (the console's case pages, recovery).

use std::path::Path;

use anyhow::Context;
use fjall::{Config, Keyspace, PartitionCreateOptions, PartitionHandle};
use rusqlite::Connection;

/// What a lookup is by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Transaction,
    Account,
    Merchant,
    Device,
    Ip,
}

impl By {
    fn tag(self) -> u8 {
        match self {
            By::Transaction => b't',
            By::Account => b'a',
            By::Merchant => b'm',
            By::Device => b'd',
            By::Ip => b'i',
        }
    }

    /// The `decisions` column it indexes.
    pub fn column(self) -> &'static str {
        match self {
            By::Transaction => "transaction_id",
            By::Account => "account_id",
            By::Merchant => "merchant_id",
            By::Device => "device_id",
            By::Ip => "ip_address",
        }
    }
}

/// The keys one decision is found by.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    pub seq: u64,
    pub transaction_id: &'a str,
    pub account_id: &'a str,
    pub merchant_id: &'a str,
    pub device_id: &'a str,
    pub ip_address: &'a str,
}

impl<'a> Keys<'a> {
    /// A row's keys: `ids` are its transaction, account, merchant, device and IP columns in
    /// that order (as [`ROW_COLUMNS`] reads them).
    pub fn of_row(seq: u64, ids: &'a [String; 5]) -> Keys<'a> {
        Keys {
            seq,
            transaction_id: &ids[0],
            account_id: &ids[1],
            merchant_id: &ids[2],
            device_id: &ids[3],
            ip_address: &ids[4],
        }
    }

    fn each(&self) -> [(By, &'a str); 5] {
        [
            (By::Transaction, self.transaction_id),
            (By::Account, self.account_id),
            (By::Merchant, self.merchant_id),
            (By::Device, self.device_id),
            (By::Ip, self.ip_address),
        ]
    }
}

/// The `decisions` columns a row's keys are read from, after `seq`.
pub const ROW_COLUMNS: &str = "transaction_id, account_id, merchant_id, device_id, ip_address";

/// The directory of the index, beside the journal file.
pub const LOOKUP_DIR: &str = "journal-lookup";

/// The high-water mark: the newest seq whose keys are in the index.
const UPTO: &[u8] = b"upto";
/// Which kinds of key the index holds (their tags): a change re-indexes from the start.
const KINDS: &[u8] = b"kinds";
const ALL: [By; 5] = [
    By::Transaction,
    By::Account,
    By::Merchant,
    By::Device,
    By::Ip,
];

/// A handle on the lookup index; cheap to clone.
#[derive(Clone)]
pub struct Lookup {
    /// The kinds kept: transaction ids always; the neighbours' keys only for the console.
    kinds: &'static [By],
    keyspace: Keyspace,
    keys: PartitionHandle,
    meta: PartitionHandle,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup").finish_non_exhaustive()
    }
}

fn prefix(by: By, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 10);
    k.push(by.tag());
    k.extend_from_slice(value.as_bytes());
    k.push(0xFF);
    k
}

impl Lookup {
    /// Opens (or creates) the index in `dir`: of transaction ids, and with `neighbours` of
    /// accounts, merchants, devices and IPs too (the console's case pages read them; each
    /// kind costs the writer about a microsecond a decision, so a server nobody logs in to
    /// keeps only ids).
    pub fn open(dir: &Path, neighbours: bool) -> anyhow::Result<Lookup> {
        let keyspace = Config::new(dir)
            // One of each: this box's cores belong to scoring.
            .flush_workers(1)
            .compaction_workers(1)
            .cache_size(16 * 1024 * 1024)
            .open()
            .with_context(|| format!("opening the journal's lookup index {}", dir.display()))?;
        let keys = keyspace
            .open_partition("keys", PartitionCreateOptions::default())
            .context("opening the lookup index's keys")?;
        let meta = keyspace
            .open_partition("meta", PartitionCreateOptions::default())
            .context("opening the lookup index's metadata")?;
        let kinds: &'static [By] = if neighbours { &ALL } else { &ALL[..1] };
        let tags: Vec<u8> = kinds.iter().map(|k| k.tag()).collect();
        let lookup = Lookup {
            kinds,
            keyspace,
            keys,
            meta,
        };
        let had = lookup
            .meta
            .get(KINDS)
            .context("reading the lookup index's kinds")?;
        if had.as_deref() != Some(&tags[..]) {
            // Other kinds than last time: index every row again (keys are idempotent; a kind
            // no longer kept is left, unread).
            let mut batch = lookup.keyspace.batch();
            batch.insert(&lookup.meta, KINDS, tags);
            batch.insert(&lookup.meta, UPTO, 0u64.to_be_bytes());
            batch
                .commit()
                .context("resetting the lookup index's mark")?;
        }
        Ok(lookup)
    }

    /// Whether lookups by `by` are kept.
    pub fn keeps(&self, by: By) -> bool {
        self.kinds.contains(&by)
    }

    /// The newest seq indexed (0 when none).
    pub fn upto(&self) -> anyhow::Result<u64> {
        let v = self
            .meta
            .get(UPTO)
            .context("reading the lookup index's mark")?;
        Ok(v.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Adds the keys of committed decisions, in one atomic batch with the new mark.
    pub fn add<'a>(&self, decisions: impl IntoIterator<Item = Keys<'a>>) -> anyhow::Result<()> {
        let mut batch = self.keyspace.batch();
        let mut upto = None;
        for d in decisions {
            for (by, value) in d.each() {
                if value.is_empty() || !self.kinds.contains(&by) {
                    continue;
                }
                let mut k = prefix(by, value);
                k.extend_from_slice(&d.seq.to_be_bytes());
                batch.insert(&self.keys, k, []);
            }
            upto = upto.max(Some(d.seq));
        }
        let Some(upto) = upto else { return Ok(()) };
        if upto > self.upto()? {
            batch.insert(&self.meta, UPTO, upto.to_be_bytes());
        }
        batch.commit().context("writing the lookup index")
    }

    /// Removes the keys of deleted decisions (retention).
    pub fn remove<'a>(&self, decisions: impl IntoIterator<Item = Keys<'a>>) -> anyhow::Result<()> {
        let mut batch = self.keyspace.batch();
        for d in decisions {
            for (by, value) in d.each() {
                let mut k = prefix(by, value);
                k.extend_from_slice(&d.seq.to_be_bytes());
                batch.remove(&self.keys, k);
            }
        }
        batch.commit().context("removing from the lookup index")
    }

    /// Up to `limit` seqs of decisions whose `by` is `value`, newest first. May include a
    /// seq whose row is gone or is another's (see the invariant above): check the row.
    pub fn newest(&self, by: By, value: &str, limit: usize) -> anyhow::Result<Vec<u64>> {
        if value.is_empty() {
            return Ok(Vec::new());
        }
        let p = prefix(by, value);
        let mut out = Vec::new();
        for item in self.keys.prefix(&p).rev().take(limit) {
            let (k, _) = item.context("reading the lookup index")?;
            let seq = k
                .get(p.len()..)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .context("a malformed key in the lookup index")?;
            out.push(seq);
        }
        Ok(out)
    }

    /// Indexes the rows of `conn`'s `decisions` past the mark: after a crash lost the
    /// index's tail, or for a journal written before the index existed.
    pub fn catch_up(&self, conn: &Connection) -> anyhow::Result<u64> {
        let from = self.upto()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT seq, {ROW_COLUMNS} FROM decisions WHERE seq > ?1 ORDER BY seq"
        ))?;
        let mut rows = stmt.query([from as i64])?;
        let mut chunk: Vec<(u64, [String; 5])> = Vec::with_capacity(10_000);
        let mut added = 0u64;
        let flush = |chunk: &mut Vec<(u64, [String; 5])>| -> anyhow::Result<()> {
            self.add(chunk.iter().map(|(seq, ids)| Keys::of_row(*seq, ids)))?;
            chunk.clear();
            Ok(())
        };
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            chunk.push((
                seq as u64,
                [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
            ));
            added += 1;
            if chunk.len() == 10_000 {
                flush(&mut chunk)?;
            }
        }
        flush(&mut chunk)?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys<'a>(seq: u64, tx: &'a str, account: &'a str) -> Keys<'a> {
        Keys {
            seq,
            transaction_id: tx,
            account_id: account,
            merchant_id: "m",
            device_id: "",
            ip_address: "",
        }
    }

    #[test]
    fn finds_newest_first_and_never_a_longer_value() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lookup::open(dir.path(), true).unwrap();
        l.add([
            keys(1, "t1", "acc"),
            keys(2, "t2", "acc2"),
            keys(3, "t3", "acc"),
        ])
        .unwrap();
        assert_eq!(l.newest(By::Account, "acc", 10).unwrap(), vec![3, 1]);
        assert_eq!(l.newest(By::Account, "acc", 1).unwrap(), vec![3]);
        assert_eq!(l.newest(By::Transaction, "t2", 10).unwrap(), vec![2]);
        assert_eq!(l.newest(By::Device, "", 10).unwrap(), Vec::<u64>::new());
        assert_eq!(l.upto().unwrap(), 3);
        l.remove([keys(3, "t3", "acc")]).unwrap();
        assert_eq!(l.newest(By::Account, "acc", 10).unwrap(), vec![1]);
        drop(l);
        let l = Lookup::open(dir.path(), true).unwrap();
        assert_eq!(l.newest(By::Merchant, "m", 10).unwrap(), vec![2, 1]);
        assert_eq!(l.upto().unwrap(), 3);
        drop(l);
        // Fewer kinds: the mark starts over, so turning the console on again re-indexes.
        let l = Lookup::open(dir.path(), false).unwrap();
        assert_eq!(l.upto().unwrap(), 0);
        assert!(l.keeps(By::Transaction) && !l.keeps(By::Account));
    }
}
