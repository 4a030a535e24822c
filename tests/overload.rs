//! Overload is shed, not queued: beyond the in-flight bound calls are refused at once with
//! RESOURCE_EXHAUSTED, and the server answers normally once the burst is over.

mod common;

use common::{req, tx, TestServer};
use fraudgate::journal::Durability;
use fraudgate::serve::ServeConfig;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_bound_is_shed_and_the_server_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Synchronous durability keeps each call in flight until its commit, so a burst on one
    // connection piles up beyond a small bound.
    let server = TestServer::start_with(ServeConfig {
        data_dir: Some(dir.path().to_owned()),
        durability: Durability::Sync,
        max_in_flight_per_connection: 4,
        ..common::config()
    })
    .await;
    let client = server.client().await;
    let calls = (0..400).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let t = tx(&format!("burst-{i}"), &format!("a-{}", i % 9), "m", 700, i);
            client.score(req(t)).await.map(|r| r.into_inner())
        })
    });
    let mut ok = Vec::new();
    let mut shed = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.unwrap() {
            Ok(resp) => ok.push(resp),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(
        shed > 0,
        "nothing was shed: all {} calls were queued",
        ok.len()
    );
    assert!(!ok.is_empty(), "everything was shed");

    // A refused call changed nothing: retried now, each is scored afresh (not a replay),
    // and every accepted one is in the journal exactly once.
    let mut client = server.client().await;
    let r = client
        .score(req(tx("after", "a-1", "m", 700, 10_000)))
        .await
        .expect("the server answers normally after the burst")
        .into_inner();
    assert!(!r.replayed);
    let conn = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    let journaled: i64 = conn
        .query_row(
            "SELECT count(*) FROM decisions WHERE transaction_id LIKE 'burst-%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(journaled as usize, ok.len());
}
