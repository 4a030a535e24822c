//! Bearer tokens: the scoring service refuses calls without an accepted token; health and
//! reflection stay open. Roles: scoring tokens never administer, admin tokens do not score
//! unless listed as scoring tokens too; the scheme is case-insensitive; a promotion records
//! the admin token's name and never the token.

mod common;

use common::{req, tx, TestServer};
use fraudgate::grpc::auth::Tokens;
use fraudgate::serve::ServeConfig;
use tonic::Code;

const TOKEN: &str = "test-token-0123456789";

fn with_token(
    token: &str,
    r: fraudgate::proto::ScoreRequest,
) -> tonic::Request<fraudgate::proto::ScoreRequest> {
    let mut r = tonic::Request::new(r);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_an_accepted_bearer_token_and_health_stays_open() {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", common::process::free_port())
        .parse()
        .unwrap();
    let server = TestServer::start_with(ServeConfig {
        metrics_listen: Some(metrics),
        tokens: Some(Tokens::parse(&format!("{TOKEN}\nother-token-0123456789")).unwrap()),
        ..common::config()
    })
    .await;
    let mut client = server.client().await;

    let none = client
        .score(req(tx("t-1", "a", "m", 100, 0)))
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = client
        .score(with_token(
            "wrong-token-0123456789",
            req(tx("t-1", "a", "m", 100, 0)),
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    let ok = client
        .score(with_token(TOKEN, req(tx("t-1", "a", "m", 100, 0))))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.replayed, "the refused calls scored nothing");
    let body = common::scrape(metrics);
    assert_eq!(
        common::metric_value(&body, "fraudgate_unauthenticated_total"),
        2.0
    );

    // Health answers without a token (TestServer::start_with waited on it too).
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fraudgate.v1.FraudScorer".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1);
}

/// ModelAdmin takes the admin token only, when one is configured; the scoring token is not
/// enough, and the admin token does not open the scoring service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_admin_token() {
    const ADMIN: &str = "admin-token-0123456789";
    let server = TestServer::start_with(ServeConfig {
        tokens: Some(Tokens::parse(TOKEN).unwrap()),
        admin_tokens: Some(Tokens::parse(ADMIN).unwrap()),
        ..common::config()
    })
    .await;
    let mut admin =
        fraudgate::proto::model_admin_client::ModelAdminClient::new(server.channel().await);
    let call = |token: Option<&str>| {
        let mut r = tonic::Request::new(fraudgate::proto::GetCurrentModelRequest {});
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    let err = admin.get_current_model(call(None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = admin
        .get_current_model(call(Some(TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a scoring token: {err:?}"
    );
    let status = admin
        .get_current_model(call(Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    assert!(status.model.unwrap().version.starts_with("fg-"));
    let mut client = server.client().await;
    let err = client
        .score(with_token(ADMIN, req(tx("t-9", "a", "m", 100, 0))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

/// Every ModelAdmin RPC, called with `token`; the codes they end with.
async fn admin_codes(
    channel: tonic::transport::Channel,
    token: &str,
) -> Vec<(&'static str, Code, String)> {
    use fraudgate::proto;
    let mut admin = proto::model_admin_client::ModelAdminClient::new(channel);
    fn with<T>(token: &str, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }
    let code = |r: Result<(), tonic::Status>| match r {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    };
    let mut out = Vec::new();
    let c = code(
        admin
            .list_models(with(token, proto::ListModelsRequest {}))
            .await
            .map(drop),
    );
    out.push(("ListModels", c.0, c.1));
    let c = code(
        admin
            .get_current_model(with(token, proto::GetCurrentModelRequest {}))
            .await
            .map(drop),
    );
    out.push(("GetCurrentModel", c.0, c.1));
    let c = code(
        admin
            .retrain(with(
                token,
                proto::RetrainRequest {
                    promote_if_better: true,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
    );
    out.push(("Retrain", c.0, c.1));
    let c = code(
        admin
            .promote(with(
                token,
                proto::PromoteRequest {
                    version: "fg-any".into(),
                },
            ))
            .await
            .map(drop),
    );
    out.push(("Promote", c.0, c.1));
    let c = code(
        admin
            .rollback(with(token, proto::RollbackRequest {}))
            .await
            .map(drop),
    );
    out.push(("Rollback", c.0, c.1));
    out
}

/// With scoring tokens and no admin tokens, the payment service's credential reaches no
/// ModelAdmin handler: every RPC is PERMISSION_DENIED, and the message says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoring_token_never_administers() {
    let server = TestServer::start_with(ServeConfig {
        tokens: Some(Tokens::parse_list(TOKEN).unwrap()),
        ..common::config()
    })
    .await;
    let codes = admin_codes(server.channel().await, TOKEN).await;
    assert_eq!(codes.len(), 5);
    for (rpc, code, message) in codes {
        assert_eq!(code, Code::PermissionDenied, "{rpc}: {message}");
        assert!(message.contains("--admin-token-file"), "{rpc}: {message}");
    }
    // With an admin token file too, the scoring token is still refused everywhere.
    let server = TestServer::start_with(ServeConfig {
        tokens: Some(Tokens::parse_list(TOKEN).unwrap()),
        admin_tokens: Some(Tokens::parse("ops:admin-token-0123456789").unwrap()),
        ..common::config()
    })
    .await;
    for (rpc, code, message) in admin_codes(server.channel().await, TOKEN).await {
        assert_eq!(code, Code::PermissionDenied, "{rpc}: {message}");
    }
    // And the admin token reaches the handlers (these fail on their own preconditions).
    let codes = admin_codes(server.channel().await, "admin-token-0123456789").await;
    assert_eq!(codes[0].1, Code::Ok, "{codes:?}");
    assert_eq!(codes[1].1, Code::Ok, "{codes:?}");
    for (rpc, code, message) in &codes[2..] {
        assert!(
            !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
            "{rpc}: {code:?} {message}"
        );
    }
}

/// An admin token scores only if it is listed as a scoring token too; the scheme may be
/// written in any case; anything else in `authorization` is told what is expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_the_bearer_scheme() {
    const ADMIN: &str = "admin-token-0123456789";
    const BOTH: &str = "both-token-0123456789";
    let server = TestServer::start_with(ServeConfig {
        tokens: Some(Tokens::parse(&format!("payments:{TOKEN}\nops:{BOTH}")).unwrap()),
        admin_tokens: Some(Tokens::parse(&format!("admin:{ADMIN}\nops:{BOTH}")).unwrap()),
        ..common::config()
    })
    .await;
    let mut client = server.client().await;
    let err = client
        .score(with_token(ADMIN, req(tx("r-1", "a", "m", 100, 0))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    client
        .score(with_token(BOTH, req(tx("r-2", "a", "m", 100, 0))))
        .await
        .expect("a token in both lists scores");
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let mut r = tonic::Request::new(req(tx(&format!("r-{scheme}"), "a", "m", 100, 1)));
        r.metadata_mut().insert(
            "authorization",
            format!("{scheme} {TOKEN}").parse().unwrap(),
        );
        client
            .score(r)
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e:?}"));
    }
    let mut r = tonic::Request::new(req(tx("r-basic", "a", "m", 100, 2)));
    r.metadata_mut()
        .insert("authorization", format!("Basic {TOKEN}").parse().unwrap());
    let err = client.score(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("Bearer <token>"), "{err:?}");
}

/// A promotion made with an admin token is recorded in the registry under the token's name;
/// the token itself appears in no file of the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_records_the_admin_tokens_name_never_the_token() {
    use fraudgate::proto;
    use fraudgate::serve::ModelSource;
    const ADMIN: &str = "admin-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Two models: the embedded one and a copy under another version.
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let model = fraudgate::model::Model::embedded_default().unwrap();
    model.save(&first).unwrap();
    model.save(&second).unwrap();
    let meta = std::fs::read_to_string(second.join("model.json")).unwrap();
    let renamed = meta.replacen(&format!("\"{}\"", model.version), "\"fg-second\"", 1);
    assert_ne!(meta, renamed);
    std::fs::write(second.join("model.json"), renamed).unwrap();
    let config = |dir: &std::path::Path| ServeConfig {
        model: ModelSource::Dir(dir.to_path_buf()),
        data_dir: Some(data.clone()),
        tokens: Some(Tokens::parse_list(TOKEN).unwrap()),
        admin_tokens: Some(Tokens::parse(&format!("alice@fraud-ops:{ADMIN}")).unwrap()),
        ..common::config()
    };
    // The first start registers the first model; the second start the second.
    TestServer::start_with(config(&first))
        .await
        .stop()
        .await
        .unwrap();
    let server = TestServer::start_with(config(&second)).await;
    let mut admin = proto::model_admin_client::ModelAdminClient::new(server.channel().await);
    let mut r = tonic::Request::new(proto::PromoteRequest {
        version: model.version.to_string(),
    });
    r.metadata_mut()
        .insert("authorization", format!("bearer {ADMIN}").parse().unwrap());
    let status = admin.promote(r).await.unwrap().into_inner();
    assert_eq!(status.model.unwrap().version, &*model.version);
    server.stop().await.unwrap();
    // Stopped means closed: every connection to the journal's file is gone (the last one
    // folds and removes the WAL).
    assert!(
        !data.join("journal.db-wal").exists(),
        "the journal was left open"
    );

    let registry: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("models/registry.json")).unwrap())
            .unwrap();
    let changes = registry["changes"].as_array().unwrap();
    let last = changes.last().unwrap();
    assert_eq!(last["action"], "promote");
    assert_eq!(last["version"], &*model.version);
    assert_eq!(last["by"], "alice@fraud-ops", "{changes:?}");
    assert_eq!(changes[changes.len() - 2]["by"], "startup");
    // The token is nowhere on disk.
    let mut stack = vec![data.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                assert!(
                    !bytes.windows(ADMIN.len()).any(|w| w == ADMIN.as_bytes()),
                    "{} holds the token",
                    p.display()
                );
            }
        }
    }
}
