//! Bearer tokens: the scoring service refuses calls without an accepted token; health and
//! reflection stay open.

mod common;

use common::{req, tx, TestServer};
use fraudgate::grpc::auth::Tokens;
use fraudgate::grpc::server::ServeConfig;
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
        ..ServeConfig::default()
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
        ..ServeConfig::default()
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
    for token in [None, Some(TOKEN)] {
        let err = admin.get_current_model(call(token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
    }
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
    assert_eq!(err.code(), Code::Unauthenticated);
}
