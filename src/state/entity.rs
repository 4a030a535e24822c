//! Per-entity state: the windows plus what an account remembers about where it shops.

use super::daily::{DailyRisk, RiskView};
use super::window::{Agg, Windows, LONGEST, WINDOWS, WINDOW_SECS};
use crate::domain::EventTime;
use crate::ids::EntityKey;

/// After this long without a transaction an entity's windows are all empty, and the entity is
/// treated as new; so evicting it later changes nothing a score can see.
pub const EXPIRY_SECS: i64 = WINDOW_SECS[LONGEST];

/// What the features may know about one entity before the current transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EntityView {
    pub windows: [Agg; WINDOWS],
    /// Seconds since the entity's newest earlier transaction (0 if that one is later, as
    /// happens with out-of-order events), or `None` for a new entity.
    pub secs_since_last: Option<i64>,
}

/// A merchant, device or IP address: windows only.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EntityState {
    pub windows: Windows,
}

impl EntityState {
    /// Forgets everything if the entity has been idle for [`EXPIRY_SECS`] before `t`.
    fn expire(&mut self, t: EventTime) {
        if self.windows.head().is_some_and(|h| t - h > EXPIRY_SECS) {
            *self = EntityState::default();
        }
    }

    /// What [`EntityState::observe`] would return at `t`, without recording anything.
    pub fn view(&self, t: EventTime) -> EntityView {
        if self.windows.head().is_some_and(|h| t - h > EXPIRY_SECS) {
            return EntityState::default().view(t);
        }
        EntityView {
            windows: self.windows.stats(t),
            secs_since_last: self.windows.head().map(|h| (t - h).max(0)),
        }
    }

    /// Returns what was known before `t`, then records a transaction of `amount` at `t`.
    pub fn observe(&mut self, t: EventTime, amount: f64) -> EntityView {
        self.expire(t);
        let view = EntityView {
            windows: self.windows.stats(t),
            secs_since_last: self.windows.head().map(|h| (t - h).max(0)),
        };
        self.windows.add(t, amount);
        view
    }
}

/// A merchant: the windows, and its payments and reported frauds by day (the risk a label
/// delay lets a scorer know).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MerchantState {
    pub base: EntityState,
    pub risk: DailyRisk,
}

impl MerchantState {
    /// Newest event time seen, if any.
    pub fn head(&self) -> Option<EventTime> {
        self.base.windows.head()
    }

    /// What [`MerchantState::observe`] would return at `t`, without recording anything.
    pub fn view(&self, t: EventTime, delay_secs: i64) -> (EntityView, RiskView) {
        if self.head().is_some_and(|h| t - h > EXPIRY_SECS) {
            return MerchantState::default().view(t, delay_secs);
        }
        (self.base.view(t), self.risk.view(t, delay_secs))
    }

    /// Returns what was known before `t` (labels arriving `delay_secs` late), then records a
    /// payment of `amount` at `t`.
    pub fn observe(
        &mut self,
        t: EventTime,
        amount: f64,
        delay_secs: i64,
    ) -> (EntityView, RiskView) {
        if self.head().is_some_and(|h| t - h > EXPIRY_SECS) {
            *self = MerchantState::default();
        }
        let risk = self.risk.view(t, delay_secs);
        self.risk.add(t);
        (self.base.observe(t, amount), risk)
    }

    /// A fraud report (+1) or its correction (-1) for a payment at `t`, whose amount was
    /// usual for its account or not.
    pub fn add_fraud(&mut self, t: EventTime, delta: i32, usual_amount: bool) {
        self.base.windows.add_fraud(t, delta);
        self.risk.add_fraud(t, delta, usual_amount);
    }
}

/// What the features may know about an account before the current transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AccountView {
    pub base: EntityView,
    /// Has the account paid this merchant in the last 30 to 60 days (Bloom filter: rare false
    /// positives, no false negatives)?
    pub seen_merchant: bool,
    /// Distinct merchants among the account's last [`RECENT_MERCHANTS`] transactions.
    pub distinct_recent_merchants: u8,
}

/// How many recent merchants an account remembers exactly.
pub const RECENT_MERCHANTS: usize = 3;
/// Merchants are remembered in two Bloom generations of this many seconds each.
const BLOOM_EPOCH_SECS: i64 = EXPIRY_SECS;

/// An account (card or customer).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccountState {
    pub windows: Windows,
    /// Bloom filters of the merchants paid in the current and previous epoch.
    bloom: [u64; 2],
    /// The current Bloom epoch, modulo 2^16 (compared by signed wrapping difference).
    bloom_epoch: u16,
    /// 16-bit fingerprints (never 0) of the last merchants' keys, newest first.
    recent: [u16; RECENT_MERCHANTS],
}

// 200 bytes: with malloc's 8-byte header an account fills a 208-byte chunk exactly.
const _: () = assert!(std::mem::size_of::<AccountState>() <= 200);

fn bloom_bits(merchant: EntityKey) -> u64 {
    // Three bit positions from independent parts of the (already hashed) key.
    (1u64 << (merchant & 63)) | (1u64 << ((merchant >> 6) & 63)) | (1u64 << ((merchant >> 12) & 63))
}

fn short_key(merchant: EntityKey) -> u16 {
    // Bits the Bloom filter does not use, so the two stay independent.
    ((merchant >> 16) as u16) | 1
}

impl AccountState {
    fn expire(&mut self, t: EventTime) {
        if self.windows.head().is_some_and(|h| t - h > EXPIRY_SECS) {
            *self = AccountState::default();
        }
    }

    /// Returns what was known before `t`, then records a payment of `amount` to `merchant`.
    pub fn observe(&mut self, t: EventTime, amount: f64, merchant: EntityKey) -> AccountView {
        self.expire(t);
        let bits = bloom_bits(merchant);
        let seen = self.windows.head().is_some() && (self.bloom[0] | self.bloom[1]) & bits == bits;
        let mut distinct = 0u8;
        for (i, &m) in self.recent.iter().enumerate() {
            if m != 0 && !self.recent[..i].contains(&m) {
                distinct += 1;
            }
        }
        let view = AccountView {
            base: EntityView {
                windows: self.windows.stats(t),
                secs_since_last: self.windows.head().map(|h| (t - h).max(0)),
            },
            seen_merchant: seen,
            distinct_recent_merchants: distinct,
        };

        // Epochs modulo 2^16: a signed difference is exact for gaps under 2,700 years.
        let epoch = t.div_euclid(BLOOM_EPOCH_SECS) as u16;
        let ahead = epoch.wrapping_sub(self.bloom_epoch) as i16;
        if self.windows.head().is_none() {
            self.bloom_epoch = epoch;
        } else if ahead > 0 {
            self.bloom[1] = if ahead == 1 { self.bloom[0] } else { 0 };
            self.bloom[0] = 0;
            self.bloom_epoch = epoch;
        }
        self.bloom[0] |= bits;
        self.recent.copy_within(0..RECENT_MERCHANTS - 1, 1);
        self.recent[0] = short_key(merchant);
        self.windows.add(t, amount);
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_remembers_merchants_and_forgets_after_expiry() {
        let mut a = AccountState::default();
        let v = a.observe(0, 10.0, 42);
        assert!(!v.seen_merchant);
        assert_eq!(v.base.secs_since_last, None);
        let v = a.observe(60, 10.0, 42);
        assert!(v.seen_merchant);
        assert_eq!(v.base.secs_since_last, Some(60));
        assert_eq!(v.distinct_recent_merchants, 1);
        let v = a.observe(120, 10.0, 7);
        assert!(!v.seen_merchant);
        let v = a.observe(180 + EXPIRY_SECS, 10.0, 42);
        assert!(!v.seen_merchant, "an expired account starts afresh");
        assert_eq!(v.base.secs_since_last, None);
        assert_eq!(v.base.windows[LONGEST].count, 0);
    }

    #[test]
    fn distinct_recent_merchants_counts_the_last_few() {
        let mut a = AccountState::default();
        for (i, m) in [1u64, 2, 3, 2, 5].into_iter().enumerate() {
            a.observe(i as i64 * 10, 1.0, m << 20);
        }
        let v = a.observe(100, 1.0, 9);
        assert_eq!(v.distinct_recent_merchants, 3); // last three: 3, 2, 5
        let v = a.observe(110, 1.0, 5 << 20);
        assert_eq!(v.distinct_recent_merchants, 3); // 2, 5, 9
        let v = a.observe(120, 1.0, 5 << 20);
        assert_eq!(v.distinct_recent_merchants, 2); // 5, 9, 5
    }
}
