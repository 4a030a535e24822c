//! Analysts' rules on the hot path: 20 typical rules (amount and country, velocity features,
//! scores, night hours, string tests, list lookups against lists of 10^5 and 10^6 entries)
//! evaluated for one payment, and the same with no rules at all (the cost every call pays).
//!
//!     cargo bench --bench rules

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fraudgate::features::{FEATURES, N_FEATURES};
use fraudgate::rules::{Action, Change, Entry, Input, ListKind, Mode, Rule, RuleBook};

/// Twenty rules of the kinds a fraud team writes.
const RULES: [(&str, Action); 20] = [
    ("tx.amount > 1000.0 && tx.country != 'FR'", Action::Deny),
    ("tx.amount > 500.0 && tx.hour < 6", Action::Review),
    ("features.acct_count_1h > 5.0", Action::Review),
    (
        "features.acct_count_1h > 10.0 && tx.amount > 50.0",
        Action::Deny,
    ),
    (
        "score > 0.8 && tx.channel == 'CHANNEL_ECOMMERCE'",
        Action::Deny,
    ),
    ("anomaly_score > 0.9", Action::Review),
    ("tx.country in ['KP', 'IR', 'SY', 'CU']", Action::Deny),
    (
        "tx.merchant_category_code in ['7995', '6051', '4829']",
        Action::Review,
    ),
    ("in_list('blocked_devices', tx.device_id)", Action::Deny),
    ("in_list('blocked_ips', tx.ip_address)", Action::Deny),
    ("in_list('trusted_accounts', tx.account_id)", Action::Allow),
    ("in_list('risky_prefixes', tx.account_id)", Action::Review),
    ("tx.device_id.startsWith('emu-')", Action::Review),
    ("tx.amount_minor > 2000000", Action::Deny),
    ("classifier_score > 0.7 && tx.amount > 200.0", Action::Deny),
    ("tx.currency != 'EUR' && tx.amount > 300.0", Action::Review),
    (
        "tx.weekday == 0 && tx.hour >= 22 && tx.amount > 100.0",
        Action::Review,
    ),
    ("size(tx.merchant_id) < 3", Action::Review),
    (
        "tx.amount > 100.0 * features.acct_mean_7d_vs_before + 100.0",
        Action::Review,
    ),
    (
        "features.acct_count_1h + features.acct_count_1d > 40.0",
        Action::Deny,
    ),
];

fn book(rules: usize) -> RuleBook {
    let book = RuleBook::default();
    let mut version = 0;
    let mut put_list = |name: &str, kind, n: usize, value: &dyn Fn(usize) -> String| {
        let entries = (0..n)
            .map(|i| {
                let entry = Entry {
                    expires_at: None,
                    comment: String::new(),
                };
                (value(i), entry)
            })
            .collect();
        let change = book
            .read()
            .lists
            .check_put(name, Some(kind), entries)
            .expect("valid list");
        version += 1;
        book.apply(version, Change::Lists(change));
    };
    put_list("blocked_devices", ListKind::String, 1_000_000, &|i| {
        format!("dev-{i}")
    });
    put_list("blocked_ips", ListKind::Ip, 100_000, &|i| {
        format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
    });
    put_list("trusted_accounts", ListKind::String, 100_000, &|i| {
        format!("vip-{i}")
    });
    put_list("risky_prefixes", ListKind::Prefix, 1_000, &|i| {
        format!("x{i:03}")
    });
    for (i, (expression, action)) in RULES.iter().take(rules).enumerate() {
        let rule = Rule {
            id: format!("r{i}"),
            description: String::new(),
            expression: (*expression).into(),
            action: *action,
            mode: Mode::Enforce,
            enabled: true,
            version: 0,
            updated_at_ms: 0,
            updated_by: String::new(),
        };
        let (rule, compiled) = book.check_rule(rule).expect("rule compiles");
        version += 1;
        book.apply(version, Change::PutRule(rule, compiled));
    }
    book
}

fn bench(c: &mut Criterion) {
    let mut features = [0.0; N_FEATURES];
    for (i, f) in FEATURES.iter().enumerate() {
        features[i] = match f.name {
            "acct_count_1h" => 2.0,
            "acct_count_1d" => 6.0,
            _ => 1.0,
        };
    }
    // A payment that hits none of the rules: every rule runs to its end.
    let input = Input {
        transaction_id: "tx-1",
        account_id: "acct-123456",
        merchant_id: "merch-7",
        amount: 129.99,
        amount_minor: 12_999,
        currency: "EUR",
        country: "FR",
        channel: "CHANNEL_ECOMMERCE",
        merchant_category_code: "5411",
        device_id: "dev-fresh-1",
        ip_address: "192.0.2.77",
        event_time: 1_746_180_900,
        features: &features,
        score: 0.12,
        anomaly_score: 0.2,
        classifier_score: 0.1,
    };
    let twenty = book(20);
    let hits = twenty.evaluate(&input).hits;
    assert!(hits.is_empty(), "{hits:?}");
    c.bench_function("rules: 20 typical rules, none hits", |b| {
        b.iter(|| black_box(twenty.evaluate(black_box(&input))))
    });
    let hit = Input {
        device_id: "dev-4242",
        ..input
    };
    assert_eq!(twenty.evaluate(&hit).hits.len(), 1);
    c.bench_function("rules: 20 typical rules, one hits (list)", |b| {
        b.iter(|| black_box(twenty.evaluate(black_box(&hit))))
    });
    interpreter(c, &features);
    let none = book(0);
    c.bench_function("rules: none defined", |b| {
        b.iter(|| black_box(none.evaluate(black_box(&input))))
    });
}

/// The same rules and payment through the `cel` crate's own interpreter (its lazy variable
/// resolver, nothing converted up front): why fraudgate compiles expressions itself.
fn interpreter(c: &mut Criterion, features: &[f64; N_FEATURES]) {
    use cel::common::types::{CelDouble, CelInt, CelString};
    use cel::common::value::{CowVal, Val};
    use cel::context::VariableResolver;
    use cel::{Context, Env, Value};
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;

    struct Vars<'a> {
        strings: HashMap<&'static str, CelString<'a>>,
        doubles: HashMap<&'static str, CelDouble>,
        ints: HashMap<&'static str, CelInt>,
        features: Vec<CelDouble>,
        index: &'a HashMap<&'static str, usize>,
    }
    impl VariableResolver for Vars<'_> {
        fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
            let v: &dyn Val = if let Some(f) = name.strip_prefix("features.") {
                &self.features[*self.index.get(f)?]
            } else if let Some(v) = self.strings.get(name) {
                v
            } else if let Some(v) = self.doubles.get(name) {
                v
            } else {
                self.ints.get(name)?
            };
            Some(CowVal::Borrowed(v))
        }
    }
    let env = Arc::new(Env::stdlib());
    let programs: Vec<_> = RULES
        .iter()
        .map(|(e, _)| env.compile(e).expect("cel compiles"))
        .collect();
    let index: HashMap<&'static str, usize> = FEATURES
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name, i))
        .collect();
    let lists: Arc<HashSet<String>> =
        Arc::new((0..1_000_000).map(|i| format!("dev-{i}")).collect());
    c.bench_function(
        "rules: the same 20 through the cel crate's interpreter",
        |b| {
            b.iter(|| {
                let vars = Vars {
                    strings: [
                        ("tx.country", "FR"),
                        ("tx.channel", "CHANNEL_ECOMMERCE"),
                        ("tx.merchant_category_code", "5411"),
                        ("tx.device_id", "dev-fresh-1"),
                        ("tx.ip_address", "192.0.2.77"),
                        ("tx.account_id", "acct-123456"),
                        ("tx.merchant_id", "merch-7"),
                        ("tx.currency", "EUR"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k, CelString::from(v)))
                    .collect(),
                    doubles: [
                        ("tx.amount", 129.99),
                        ("score", 0.12),
                        ("anomaly_score", 0.2),
                        ("classifier_score", 0.1),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k, CelDouble::from(v)))
                    .collect(),
                    ints: [
                        ("tx.amount_minor", 12_999),
                        ("tx.hour", 10),
                        ("tx.weekday", 5),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k, CelInt::from(v)))
                    .collect(),
                    features: features.iter().map(|&f| CelDouble::from(f)).collect(),
                    index: &index,
                };
                let mut ctx = Context::with_env(Arc::clone(&env));
                let l = Arc::clone(&lists);
                let _ = ctx.add_function("in_list", move |_list: Arc<String>, v: Arc<String>| {
                    l.contains(v.as_str())
                });
                ctx.set_variable_resolver(&vars);
                let mut hits = 0;
                for p in &programs {
                    if let Ok(Value::Bool(true)) = p.execute(&ctx) {
                        hits += 1;
                    }
                }
                black_box(hits)
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
