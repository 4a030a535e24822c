//! Every validation case: refused with INVALID_ARGUMENT naming the field, and no state
//! touched (a server that saw the bad requests answers exactly like one that did not).

mod common;

use common::{explain, req, tx, TestServer};
use fraudgate::proto::{self, ReportFeedbackRequest};
use tonic::Code;
use tonic_types::StatusExt;

type Mutate = fn(&mut proto::Transaction);

fn cases() -> Vec<(&'static str, &'static str, Mutate)> {
    vec![
        ("empty transaction_id", "transaction.transaction_id", |t| {
            t.transaction_id.clear()
        }),
        (
            "over-long transaction_id",
            "transaction.transaction_id",
            |t| t.transaction_id = "x".repeat(129),
        ),
        ("empty account_id", "transaction.account_id", |t| {
            t.account_id.clear()
        }),
        ("over-long account_id", "transaction.account_id", |t| {
            t.account_id = "a".repeat(200)
        }),
        ("empty merchant_id", "transaction.merchant_id", |t| {
            t.merchant_id.clear()
        }),
        ("over-long merchant_id", "transaction.merchant_id", |t| {
            t.merchant_id = "m".repeat(129)
        }),
        ("zero amount", "transaction.amount_minor", |t| {
            t.amount_minor = 0
        }),
        ("negative amount", "transaction.amount_minor", |t| {
            t.amount_minor = -100
        }),
        ("absurd amount", "transaction.amount_minor", |t| {
            t.amount_minor = i64::MAX
        }),
        ("empty currency", "transaction.currency", |t| {
            t.currency.clear()
        }),
        ("lower-case currency", "transaction.currency", |t| {
            t.currency = "eur".into()
        }),
        ("four-letter currency", "transaction.currency", |t| {
            t.currency = "EURO".into()
        }),
        ("unknown currency", "transaction.currency", |t| {
            t.currency = "ABC".into()
        }),
        ("missing event_time", "transaction.event_time", |t| {
            t.event_time = None
        }),
        ("event_time before year 1", "transaction.event_time", |t| {
            t.event_time = Some(prost_types::Timestamp {
                seconds: -62_135_596_801,
                nanos: 0,
            })
        }),
        (
            "event_time after year 9999",
            "transaction.event_time",
            |t| {
                t.event_time = Some(prost_types::Timestamp {
                    seconds: 253_402_300_800,
                    nanos: 0,
                })
            },
        ),
        ("negative nanos", "transaction.event_time", |t| {
            t.event_time = Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -1,
            })
        }),
        ("nanos too large", "transaction.event_time", |t| {
            t.event_time = Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            })
        }),
        ("unknown channel", "transaction.channel", |t| t.channel = 42),
        (
            "bad merchant category code",
            "transaction.merchant_category_code",
            |t| t.merchant_category_code = "54a1".into(),
        ),
        ("bad country", "transaction.country", |t| {
            t.country = "France".into()
        }),
        ("over-long device_id", "transaction.device_id", |t| {
            t.device_id = "d".repeat(129)
        }),
        ("bad ip_address", "transaction.ip_address", |t| {
            t.ip_address = "300.1.2.3".into()
        }),
    ]
}

fn field_of(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    let bad = details.bad_request().expect("a BadRequest detail");
    bad.field_violations[0].field.clone()
}

#[tokio::test]
async fn every_invalid_transaction_is_refused_naming_its_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (name, field, mutate) in cases() {
        let mut t = tx("v-1", "acct-v", "m-v", 1_000, 0);
        mutate(&mut t);
        let err = client.score(req(t)).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}");
        assert!(
            err.message().starts_with(field),
            "{name}: {}",
            err.message()
        );
        assert_eq!(field_of(&err), field, "{name}");
    }
    let err = client
        .score(proto::ScoreRequest {
            transaction: None,
            explain: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (Code::InvalidArgument, "transaction")
    );
}

#[tokio::test]
async fn invalid_requests_leave_no_trace() {
    let dirty = TestServer::start().await;
    let clean = TestServer::start().await;
    let mut d = dirty.client().await;
    let mut c = clean.client().await;
    for (_, _, mutate) in cases() {
        // Same ids and entities as the valid requests below.
        let mut t = tx("same-id", "acct-x", "m-x", 1_000, 0);
        mutate(&mut t);
        let _ = d.score(req(t)).await.unwrap_err();
    }
    for i in 0..5 {
        let id = if i == 0 {
            "same-id".to_string()
        } else {
            format!("id-{i}")
        };
        let t = tx(&id, "acct-x", "m-x", 1_000 + i, i * 60);
        let a = d.score(explain(t.clone())).await.unwrap().into_inner();
        let b = c.score(explain(t)).await.unwrap().into_inner();
        assert!(!a.replayed, "a refused id was never stored");
        assert_eq!(a, b, "request {i}: answers differ after invalid requests");
    }
}

#[tokio::test]
async fn any_valid_event_time_is_accepted_including_distant_past() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (i, seconds) in [-62_135_596_800i64, -1, 0, 1_522_540_831, 253_402_300_799]
        .into_iter()
        .enumerate()
    {
        let mut t = tx(
            &format!("time-{i}"),
            &format!("acct-time-{i}"),
            "m-t",
            1_000,
            0,
        );
        t.event_time = Some(prost_types::Timestamp {
            seconds,
            nanos: 999_999_999,
        });
        let resp = client
            .score(req(t))
            .await
            .unwrap_or_else(|e| panic!("{seconds}: {e}"));
        assert!(resp.into_inner().score.is_finite());
    }
}

#[tokio::test]
async fn event_times_too_far_ahead_are_refused_when_limited() {
    let server = TestServer::start_with(fraudgate::serve::ServeConfig {
        max_future_skew: Some(std::time::Duration::from_secs(86_400)),
        ..common::config()
    })
    .await;
    let mut client = server.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut t = tx("future-1", "acct-fu", "m-fu", 1_000, 0);
    t.event_time = Some(prost_types::Timestamp {
        seconds: now + 3 * 86_400,
        nanos: 0,
    });
    let err = client.score(req(t.clone())).await.unwrap_err();
    assert_eq!(field_of(&err), "transaction.event_time");
    t.event_time = Some(prost_types::Timestamp {
        seconds: now + 3_600,
        nanos: 0,
    });
    client
        .score(req(t))
        .await
        .expect("an hour ahead is within the skew");
}

#[tokio::test]
async fn optional_context_fields_are_accepted() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut t = tx("ctx-1", "acct-ctx", "m-ctx", 1_000, 0);
    t.channel = proto::Channel::Ecommerce as i32;
    t.merchant_category_code = "5411".into();
    t.country = "FR".into();
    t.device_id = "device-1".into();
    t.ip_address = "2001:db8::1".into();
    client.score(req(t)).await.unwrap();
    let mut t = tx("ctx-2", "acct-ctx", "m-ctx", 1_000, 60);
    t.device_id = "device-1".into();
    t.ip_address = "::ffff:192.0.2.1".into();
    let resp = client.score(explain(t)).await.unwrap().into_inner();
    assert_eq!(common::feature(&resp, "device_count_1d"), 1.0);
}

#[tokio::test]
async fn invalid_feedback_is_refused_naming_its_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .score(req(tx("fb-1", "acct-fb", "m-fb", 1_000, 0)))
        .await
        .unwrap();
    let base = ReportFeedbackRequest {
        transaction_id: "fb-1".into(),
        label: proto::Label::Fraud as i32,
        ..Default::default()
    };
    let cases: Vec<(&str, ReportFeedbackRequest)> = vec![
        (
            "transaction_id",
            ReportFeedbackRequest {
                transaction_id: String::new(),
                ..base.clone()
            },
        ),
        (
            "transaction_id",
            ReportFeedbackRequest {
                transaction_id: "t".repeat(129),
                ..base.clone()
            },
        ),
        (
            "label",
            ReportFeedbackRequest {
                label: 0,
                ..base.clone()
            },
        ),
        (
            "label",
            ReportFeedbackRequest {
                label: 9,
                ..base.clone()
            },
        ),
        (
            "source",
            ReportFeedbackRequest {
                source: 9,
                ..base.clone()
            },
        ),
        (
            "action_taken",
            ReportFeedbackRequest {
                action_taken: -1,
                ..base.clone()
            },
        ),
        (
            "reported_at",
            ReportFeedbackRequest {
                reported_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..base.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let err = client.report_feedback(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(field_of(&err), field);
    }
    let ok = client.report_feedback(base).await.unwrap().into_inner();
    assert!(ok.applied, "nothing was applied by the refused feedback");
}
