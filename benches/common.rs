//! Shared by the benches: simulated traffic as validated transactions.

use fraudgate::domain::Transaction;
use fraudgate::proto;
use fraudgate::sim::{SimParams, Simulator};
use fraudgate::wire::parse::{self, ParseLimits};

/// `n` simulated payments over `accounts` accounts, as requests.
pub fn requests(accounts: usize, n: usize) -> Vec<proto::ScoreRequest> {
    let mut sim = Simulator::new(SimParams {
        accounts,
        merchants: (accounts / 10).max(100),
        days: u32::MAX,
        seed: 5,
        start: 1_735_689_600,
        fraud_scale: 1.0,
    })
    .expect("simulator");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        for p in sim.next_day().expect("endless") {
            if out.len() == n {
                break;
            }
            let id = format!("b-{}", out.len());
            out.push(p.to_request(id));
        }
    }
    out
}

/// The same as validated transactions.
#[allow(dead_code)] // not every bench takes both forms
pub fn transactions(accounts: usize, n: usize) -> Vec<Transaction> {
    requests(accounts, n)
        .into_iter()
        .map(|r| parse::transaction(&r, &ParseLimits::default()).expect("valid"))
        .collect()
}
