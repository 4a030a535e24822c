//! Bytes of state per account at 10^6 accounts: one payment each from a million accounts
//! (at 1,000 merchants), heap bytes counted by a counting allocator; then bytes per merchant
//! at 10^5 merchants (one account paying each once).
//!
//!     cargo bench --bench state_memory

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use fraudgate::domain::{Channel, Transaction};
use fraudgate::ids::{entity_key, EntityKind};
use fraudgate::state::State;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Resident set size in bytes (Linux), for the allocator's own overhead.
fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The `i`-th payment (a second apart) of `amount` from `account` to `merchant`.
fn payment(i: u64, account: u64, merchant: u64, amount: f64) -> Transaction {
    Transaction {
        id: String::new(),
        key: i as u128,
        account,
        merchant,
        amount_minor: (amount * 100.0).round() as i64,
        currency: *b"EUR",
        amount,
        event_time: 1_735_689_600 + i as i64,
        event_nanos: 0,
        channel: Channel::CardPresent,
        mcc: None,
        country: None,
        device: None,
        ip: None,
    }
}

fn main() {
    const ACCOUNTS: u64 = 1_000_000;
    const MERCHANTS: u64 = 1_000;
    let state = State::new();
    let rss_before = rss();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..ACCOUNTS {
        let tx = payment(
            i,
            entity_key(EntityKind::Account, i.to_le_bytes()),
            entity_key(EntityKind::Merchant, (i % MERCHANTS).to_le_bytes()),
            10.0 + (i % 5_000) as f64 / 100.0,
        );
        state.observe(&tx, 7 * 86_400);
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let rss_bytes = rss().zip(rss_before).map(|(a, b)| a.saturating_sub(b));
    let counts = state.counts();
    assert_eq!(counts.accounts as u64, ACCOUNTS);
    println!(
        "state_memory: {} accounts, {} merchants: {:.1} MB of state, {:.0} bytes per account (target <= 256)",
        counts.accounts,
        counts.merchants,
        bytes as f64 / 1e6,
        bytes as f64 / ACCOUNTS as f64
    );
    if let Some(r) = rss_bytes {
        println!(
            "state_memory: resident set grew by {:.1} MB, {:.0} bytes per account (includes malloc's per-allocation overhead)",
            r as f64 / 1e6,
            r as f64 / ACCOUNTS as f64
        );
    }
    drop(state);

    const MANY_MERCHANTS: u64 = 100_000;
    let state = State::new();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..MANY_MERCHANTS {
        let tx = payment(
            i,
            entity_key(EntityKind::Account, 1u64.to_le_bytes()),
            entity_key(EntityKind::Merchant, i.to_le_bytes()),
            10.0,
        );
        state.observe(&tx, 7 * 86_400);
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(state.counts().merchants as u64, MANY_MERCHANTS);
    println!(
        "state_memory: {} merchants: {:.1} MB of state, {:.0} bytes per merchant",
        MANY_MERCHANTS,
        bytes as f64 / 1e6,
        bytes as f64 / MANY_MERCHANTS as f64
    );
}
