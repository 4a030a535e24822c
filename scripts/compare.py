#!/usr/bin/env python3
"""Compare fraudgate's served models with the usual Python tools on the same feature matrix.

Input: the CSV `fraudgate features` writes (ids, event time, label, fraudgate's served score
and anomaly score, then every feature as the server computed it, labels arriving late).
Split by event time as `fraudgate train` splits: burn-in, fit, validation, holdout. scikit-learn's
random forest and LightGBM are fitted on the fit period (LightGBM stops early on the
validation period) and every model is evaluated on the holdout: AUC ROC, average precision
and card precision@k (per day: of the k accounts with the highest score that day, the share
that really had a fraud that day, accounts already caught on an earlier day left out; the
mean over days). River's HalfSpaceTrees and fraudgate's anomaly model are compared on the
same holdout stream: AUC and events per second.

    python3 scripts/compare.py --features /tmp/features.csv --json /tmp/compare.json

Needs: pip install scikit-learn lightgbm river pandas
"""

import argparse
import json
import time

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import average_precision_score, roc_auc_score

DAY = 86_400
META = ["transaction_id", "account_id", "event_time", "label", "score", "anomaly_score"]


def card_precision_at_k(df, scores, k):
    """Mean over days of the share of the day's top-k accounts that had a fraud that day,
    leaving out accounts already caught (a fraud among an earlier day's top k)."""
    d = pd.DataFrame(
        {
            "day": df["event_time"].to_numpy() // DAY,
            "account": df["account_id"].to_numpy(),
            "score": scores,
            "fraud": df["label"].to_numpy() == 1,
        }
    )
    caught = set()
    precisions = []
    for _, day in d.groupby("day", sort=True):
        per_account = day.groupby("account").agg(score=("score", "max"), fraud=("fraud", "max"))
        per_account = per_account[~per_account.index.isin(caught)]
        top = per_account.sort_values("score", ascending=False, kind="mergesort").head(k)
        if len(top) == 0:
            continue
        precisions.append(top["fraud"].sum() / k)
        caught.update(top.index[top["fraud"]])
    return float(np.mean(precisions)) if precisions else 0.0


def evaluate(name, df, scores, k):
    y = df["label"].to_numpy() == 1
    return {
        "model": name,
        "auc_roc": float(roc_auc_score(y, scores)),
        "average_precision": float(average_precision_score(y, scores)),
        f"card_precision_at_{k}": card_precision_at_k(df, scores, k),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True)
    p.add_argument("--burn-in-days", type=int, default=7)
    p.add_argument("--validation-days", type=int, default=14)
    p.add_argument("--holdout-days", type=int, default=21)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--river-events", type=int, default=100_000,
                   help="holdout events River scores (it is slow); fraudgate's anomaly AUC is on the same events")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    df = pd.read_csv(args.features, dtype={"transaction_id": str, "account_id": str})
    df = df[df["label"].notna()].sort_values("event_time", kind="mergesort").reset_index(drop=True)
    features = [c for c in df.columns if c not in META]
    first, last = df["event_time"].min(), df["event_time"].max()
    burn_in_end = first + args.burn_in_days * DAY
    holdout_from = last - args.holdout_days * DAY
    validation_from = holdout_from - args.validation_days * DAY
    fit = df[(df["event_time"] >= burn_in_end) & (df["event_time"] < validation_from)]
    val = df[(df["event_time"] >= validation_from) & (df["event_time"] < holdout_from)]
    hold = df[df["event_time"] >= holdout_from]
    x = lambda d: d[features].to_numpy(dtype=np.float64)
    y = lambda d: (d["label"] == 1).to_numpy()
    print(f"fit {len(fit)} rows ({y(fit).sum()} fraud), validation {len(val)} ({y(val).sum()}), "
          f"holdout {len(hold)} ({y(hold).sum()}); {len(features)} features")

    results = [evaluate("fraudgate (served)", hold, hold["score"].to_numpy(), args.k)]

    t = time.time()
    rf = RandomForestClassifier(n_estimators=200, min_samples_leaf=5, n_jobs=-1,
                                class_weight=None, random_state=args.seed)
    rf.fit(x(fit), y(fit))
    r = evaluate("scikit-learn random forest (200 trees)", hold, rf.predict_proba(x(hold))[:, 1], args.k)
    r["fit_seconds"] = time.time() - t
    results.append(r)

    import lightgbm as lgb

    t = time.time()
    gbm = lgb.LGBMClassifier(n_estimators=2000, learning_rate=0.03, num_leaves=63,
                             min_child_samples=20, subsample=0.8, subsample_freq=1,
                             colsample_bytree=0.8, random_state=args.seed, verbose=-1)
    gbm.fit(x(fit), y(fit), eval_set=[(x(val), y(val))], eval_metric="average_precision",
            callbacks=[lgb.early_stopping(100, verbose=False)])
    r = evaluate("LightGBM (early stopping on validation)", hold, gbm.predict_proba(x(hold))[:, 1], args.k)
    r["fit_seconds"] = time.time() - t
    r["trees"] = int(gbm.best_iteration_ or gbm.n_estimators)
    results.append(r)

    # Anomaly models on the same holdout stream, in event-time order.
    from river import anomaly

    stream = hold.head(args.river_events)
    ys = y(stream)
    anomalies = {
        "events": int(len(stream)),
        "fraudgate_auc_roc": float(roc_auc_score(ys, stream["anomaly_score"].to_numpy())),
    }
    fit_x = x(fit)
    scalings = {
        # What fraudgate's anomaly model uses: the fit period's 0.5th-99.5th percentiles.
        "percentile": (np.percentile(fit_x, 0.5, axis=0), np.percentile(fit_x, 99.5, axis=0)),
        "minmax": (fit_x.min(axis=0), fit_x.max(axis=0)),
    }
    for name, (lo, hi) in scalings.items():
        span = np.where(hi > lo, hi - lo, 1.0)
        points = [dict(zip(features, row)) for row in np.clip((x(stream) - lo) / span, 0.0, 1.0)]
        hst = anomaly.HalfSpaceTrees(n_trees=25, height=8, window_size=1000, seed=args.seed)
        # Warm River up on the end of the fit period, as fraudgate's model arrives warm.
        for row in np.clip((x(fit.tail(5_000)) - lo) / span, 0.0, 1.0):
            hst.learn_one(dict(zip(features, row)))
        scores = np.empty(len(points))
        t = time.time()
        for i, point in enumerate(points):
            scores[i] = hst.score_one(point)
            hst.learn_one(point)
        secs = time.time() - t
        anomalies[f"river_{name}_auc_roc"] = float(roc_auc_score(ys, scores))
        anomalies[f"river_{name}_events_per_second"] = len(points) / secs

    width = max(len(r["model"]) for r in results)
    print(f"\nholdout ({len(hold)} rows, {y(hold).sum()} fraud):")
    print(f"{'model':<{width}}  AUC ROC  avg prec  card prec@{args.k}")
    for r in results:
        print(f"{r['model']:<{width}}  {r['auc_roc']:.4f}   {r['average_precision']:.4f}    "
              f"{r[f'card_precision_at_{args.k}']:.4f}")
    print(f"\nanomaly models on {anomalies['events']} holdout events:")
    for name in ("percentile", "minmax"):
        print(f"River HalfSpaceTrees ({name} scaling): AUC {anomalies[f'river_{name}_auc_roc']:.4f}, "
              f"{anomalies[f'river_{name}_events_per_second']:.0f} events/s (score + learn)")
    print(f"fraudgate anomaly:    AUC {anomalies['fraudgate_auc_roc']:.4f} "
          f"(events/s: cargo run --release --example anomaly_learning)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"holdout": results, "anomaly": anomalies,
                       "rows": {"fit": len(fit), "validation": len(val), "holdout": len(hold)}},
                      f, indent=2)


if __name__ == "__main__":
    main()
