//! ModelAdmin over gRPC against a real server with a journal: retraining from the journal
//! produces a challenger; a better one is promoted with no failed request during the swap; one
//! that does not beat the champion by the margin is not; rollback restores the champion; a
//! restart serves the model last promoted; a server without a journal refuses to retrain;
//! the binary's `--retrain-*` flags shape the challenger.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::process::ServerProcess;
use common::TestServer;
use fraudgate::dataset::{self, LabelledRequest};
use fraudgate::model::forest::ForestParams;
use fraudgate::proto::fraud_scorer_client::FraudScorerClient;
use fraudgate::proto::{self, model_admin_client::ModelAdminClient};
use fraudgate::retrain::RetrainParams;
use fraudgate::serve::{ModelSource, ServeConfig};
use fraudgate::sim::{self, SimParams};
use fraudgate::train::{self, TrainParams};
use tonic::transport::Channel;
use tonic::Code;

fn simulate(dir: &std::path::Path, name: &str, seed: u64, days: u32) -> std::path::PathBuf {
    let path = dir.join(name);
    sim::simulate(
        &SimParams {
            accounts: 300,
            merchants: 80,
            days,
            seed,
            start: 1_735_689_600, // 2025-01-01
            fraud_scale: 15.0,
        },
        &path,
    )
    .unwrap();
    path
}

/// A deliberately weak champion: one stump.
fn weak_model(dir: &std::path::Path) -> std::path::PathBuf {
    let input = simulate(dir, "weak.csv", 5, 12);
    let output = dir.join("weak-model");
    train::train(&TrainParams {
        input,
        output: output.clone(),
        label_delay_secs: 86_400,
        burn_in_days: 2,
        validation_days: 4,
        holdout_days: 4,
        forest: ForestParams {
            n_trees: 1,
            max_depth: 1,
            ..ForestParams::default()
        },
        progress: false,
        ..TrainParams::default()
    })
    .unwrap();
    output
}

fn config(data: &std::path::Path, model: ModelSource) -> ServeConfig {
    ServeConfig {
        data_dir: Some(data.to_owned()),
        model,
        retrain: RetrainParams {
            maturity_secs: 86_400,
            min_frauds: 10,
            ..ServeConfig::default().retrain
        },
        ..common::config()
    }
}

/// Twenty days of simulated payments, in event-time order.
fn live_traffic(dir: &std::path::Path) -> Vec<LabelledRequest> {
    let path = simulate(dir, "live.csv", 9, 20);
    let mut requests: Vec<LabelledRequest> = dataset::read_requests(&path).unwrap();
    requests.sort_by_key(|r| {
        r.request
            .transaction
            .as_ref()
            .unwrap()
            .event_time
            .unwrap()
            .seconds
    });
    requests
}

/// Scores `requests` and reports each fraud as soon as it is scored.
async fn feed(client: &mut FraudScorerClient<Channel>, requests: &[LabelledRequest]) {
    for chunk in requests.chunks(2_000) {
        let mut answers = client
            .score_stream(tokio_stream::iter(
                chunk.iter().map(|r| r.request.clone()).collect::<Vec<_>>(),
            ))
            .await
            .unwrap()
            .into_inner();
        while answers.message().await.unwrap().is_some() {}
        for r in chunk.iter().filter(|r| r.label == Some(true)) {
            let id = &r.request.transaction.as_ref().unwrap().transaction_id;
            client.report_feedback(common::fraud(id)).await.unwrap();
        }
    }
}

async fn current(admin: &mut ModelAdminClient<tonic::transport::Channel>) -> String {
    admin
        .get_current_model(proto::GetCurrentModelRequest {})
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_promote_rollback_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let weak = weak_model(dir.path());
    let data = dir.path().join("data");
    let server = TestServer::start_with(config(&data, ModelSource::Dir(weak))).await;
    let mut admin = ModelAdminClient::new(server.channel().await);
    let champion = current(&mut admin).await;

    // Twenty days of traffic, labels reported as soon as each payment is scored.
    let requests = live_traffic(dir.path());
    let mut client = server.client().await;
    feed(&mut client, &requests).await;

    // Load during the retraining and the swap: every call must succeed, each answered by
    // one whole model.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        let mut client = server.client().await;
        let template = requests[requests.len() - 1].request.clone();
        tokio::spawn(async move {
            let (mut failures, mut versions) = (0, std::collections::BTreeSet::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut r = template.clone();
                r.transaction.as_mut().unwrap().transaction_id = format!("during-{i}");
                i += 1;
                match client.score(r).await {
                    Ok(a) => {
                        versions.insert(a.into_inner().model_version);
                    }
                    Err(_) => failures += 1,
                }
                // Paced: these unlabelled rows join the journal the next retraining reads.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            (failures, versions, i)
        })
    };
    let retrained = admin
        .retrain(proto::RetrainRequest {
            promote_if_better: true,
            min_improvement: None,
        })
        .await
        .unwrap()
        .into_inner();
    stop.store(true, Ordering::Relaxed);
    let (failures, versions, calls) = load.await.unwrap();
    let challenger = retrained.challenger.clone().unwrap();
    let evaluation = challenger.evaluation.clone().unwrap();
    assert!(retrained.promoted, "{retrained:?}");
    assert_eq!(evaluation.champion_version, champion);
    assert!(
        evaluation.challenger_average_precision > evaluation.champion_average_precision + 0.005,
        "{evaluation:?}"
    );
    assert!(
        evaluation.eval_frauds >= 10 && evaluation.fitted_frauds >= 10,
        "{evaluation:?}"
    );
    assert_eq!(current(&mut admin).await, challenger.version);
    assert_eq!(failures, 0, "calls failed during the swap");
    assert!(calls > 0);
    assert!(
        versions
            .iter()
            .all(|v| *v == champion || *v == challenger.version),
        "{versions:?}"
    );
    let mut r = requests[requests.len() - 1].request.clone();
    r.transaction.as_mut().unwrap().transaction_id = "after-swap".into();
    let after = client.score(r).await.unwrap().into_inner();
    assert_eq!(after.model_version, challenger.version);

    // A challenger that must gain a whole point of average precision is not promoted.
    let refused = admin
        .retrain(proto::RetrainRequest {
            promote_if_better: true,
            min_improvement: Some(1.0),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.promoted, "{refused:?}");
    assert!(
        refused.verdict.contains("promotion needs +1.0000"),
        "{}",
        refused.verdict
    );
    assert_eq!(current(&mut admin).await, challenger.version);

    // Unknown versions and bad arguments name the field.
    let unknown = admin
        .promote(proto::PromoteRequest {
            version: "fg-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().starts_with("version:"), "{unknown:?}");

    // Rollback: the champion serves again.
    let rolled = admin
        .rollback(proto::RollbackRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.model.unwrap().version, champion);
    let models = admin
        .list_models(proto::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(models.len() >= 2, "{models:?}");
    assert_eq!(models.iter().filter(|m| m.current).count(), 1);
    assert!(models
        .iter()
        .any(|m| m.version == challenger.version && !m.current));
    // And promote by version brings the challenger back.
    admin
        .promote(proto::PromoteRequest {
            version: challenger.version.clone(),
        })
        .await
        .unwrap();

    // A restart without --model serves the model last promoted.
    drop((client, admin));
    server.stop().await.unwrap();
    let server = TestServer::start_with(config(&data, ModelSource::Embedded)).await;
    let mut admin = ModelAdminClient::new(server.channel().await);
    assert_eq!(current(&mut admin).await, challenger.version);
}

#[tokio::test]
async fn a_server_without_a_journal_cannot_retrain() {
    let server = TestServer::start().await;
    let mut admin = ModelAdminClient::new(server.channel().await);
    let err = admin
        .retrain(proto::RetrainRequest {
            promote_if_better: true,
            min_improvement: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let rollback = admin.rollback(proto::RollbackRequest {}).await.unwrap_err();
    assert_eq!(rollback.code(), Code::FailedPrecondition, "{rollback:?}");
}

/// The serving binary's `--retrain-trees`, `--retrain-max-depth` and `--retrain-rows` reach
/// the challenger it fits, as its `model.json` in the data directory records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrain_flags_shape_the_challenger() {
    let dir = tempfile::tempdir().unwrap();
    let weak = weak_model(dir.path());
    let data = dir.path().join("data");
    let server = ServerProcess::start(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--model",
        weak.to_str().unwrap(),
        "--retrain-maturity",
        "1d",
        "--retrain-trees",
        "3",
        "--retrain-max-depth",
        "4",
        "--retrain-rows",
        "2000",
    ])
    .await;
    feed(&mut server.client().await, &live_traffic(dir.path())).await;
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let retrained = ModelAdminClient::new(channel)
        .retrain(proto::RetrainRequest {
            promote_if_better: false,
            min_improvement: None,
        })
        .await
        .unwrap()
        .into_inner();
    let challenger = retrained.challenger.unwrap();
    assert!(!retrained.promoted);
    let evaluation = challenger.evaluation.unwrap();
    // Legitimate rows are sampled one by one with the probability that makes 2,000 in all.
    assert!(
        (1_800..=2_200).contains(&evaluation.fitted_rows)
            && evaluation.eval_rows * 3 > evaluation.fitted_rows,
        "{evaluation:?}"
    );
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            data.join("models")
                .join(&challenger.version)
                .join("model.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let params = &meta["classifier"]["params"];
    assert_eq!(params["n_trees"], 3, "{params}");
    assert_eq!(params["max_depth"], 4, "{params}");
}

/// The training thread runs at nice 19 and, on Linux, under SCHED_IDLE, so serving
/// workers preempt it.
#[cfg(target_os = "linux")]
#[test]
fn training_threads_yield_to_serving() {
    let (policy, nice) = std::thread::spawn(|| {
        fraudgate::retrain::lower_priority();
        // SAFETY: no memory-safety preconditions; 0 is the calling thread.
        unsafe {
            (
                libc::sched_getscheduler(0),
                libc::getpriority(libc::PRIO_PROCESS, 0),
            )
        }
    })
    .join()
    .unwrap();
    assert_eq!(policy, libc::SCHED_IDLE);
    assert_eq!(nice, 19);
    // SAFETY: as above; the test's own thread keeps the normal policy.
    assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
}
