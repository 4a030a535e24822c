#!/usr/bin/env python3
"""An offline reference on the fraud handbook benchmark: LightGBM on the book's 15 features.

The features are the book's (Chapter 3), computed causally with its 7-day label delay:
the amount, weekend, night (hour <= 6); per card, the number of payments and their mean
amount over the last 1, 7 and 30 days (the current payment included, as the book does); per
terminal, the number of payments and the share of fraud over [t - 7d - w, t - 7d] for
w = 1, 7, 30 days. Trained on the payments from 2018-05-01 to 2018-07-24 (labels matured by
2018-08-01), early-stopped on a slice of that period's end, then measured on the test week
2018-08-08 .. 08-14 with the book's exclusion of known-compromised cards, as
`fraudgate handbook replay` does (zero amounts left out).

    python3 -m venv /tmp/pyenv && /tmp/pyenv/bin/pip install pandas scikit-learn lightgbm
    /tmp/pyenv/bin/python scripts/handbook_lightgbm.py [../shared/datasets/handbook/transactions.csv.gz]

Prints AUC ROC, average precision and card precision@100. About two minutes on 2 cores.
"""

import sys

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

DELAY = 7


def card_features(df):
    out = []
    for _, g in df.groupby("CUSTOMER_ID", sort=False):
        g = g.sort_values("TX_DATETIME").set_index("TX_DATETIME")
        for w in (1, 7, 30):
            n = g["TX_AMOUNT"].rolling(f"{w}D").count()
            s = g["TX_AMOUNT"].rolling(f"{w}D").sum()
            g[f"card_nb_{w}d"] = n.values
            g[f"card_avg_{w}d"] = (s / n).values
        out.append(g.reset_index())
    return pd.concat(out)


def terminal_features(df):
    out = []
    for _, g in df.groupby("TERMINAL_ID", sort=False):
        g = g.sort_values("TX_DATETIME").set_index("TX_DATETIME")
        n_delay = g["TX_FRAUD"].rolling(f"{DELAY}D").count()
        f_delay = g["TX_FRAUD"].rolling(f"{DELAY}D").sum()
        for w in (1, 7, 30):
            n = g["TX_FRAUD"].rolling(f"{DELAY + w}D").count() - n_delay
            f = g["TX_FRAUD"].rolling(f"{DELAY + w}D").sum() - f_delay
            g[f"term_nb_{w}d"] = n.values
            g[f"term_risk_{w}d"] = np.where(n > 0, f / n.where(n > 0, 1), 0.0)
        out.append(g.reset_index())
    return pd.concat(out)


def card_precision_at_k(test, k=100):
    caught, daily = set(), []
    for _, day in test.groupby("day"):
        cards = day.groupby("CUSTOMER_ID").agg(score=("score", "max"), fraud=("TX_FRAUD", "max"))
        cards = cards[~cards.index.isin(caught)]
        top = cards.reset_index().sort_values(["score", "CUSTOMER_ID"], ascending=[False, True]).head(k)
        hits = top[top.fraud == 1].CUSTOMER_ID
        daily.append(len(hits) / k)
        caught.update(hits)
    return float(np.mean(daily))


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/handbook/transactions.csv.gz"
    df = pd.read_csv(path, parse_dates=["TX_DATETIME"])
    df = df[df.TX_AMOUNT > 0].copy()
    df["weekend"] = (df.TX_DATETIME.dt.day_of_week >= 5).astype(int)
    df["night"] = (df.TX_DATETIME.dt.hour <= 6).astype(int)
    df = card_features(df)
    df = terminal_features(df)
    df = df.sort_values(["TX_DATETIME", "TRANSACTION_ID"]).reset_index(drop=True)
    df["day"] = df.TX_DATETIME.dt.floor("D")
    features = ["TX_AMOUNT", "weekend", "night"] + [
        f"{p}_{w}d" for p in ("card_nb", "card_avg", "term_nb", "term_risk") for w in (1, 7, 30)
    ]

    train = df[(df.day >= "2018-05-01") & (df.day < "2018-07-25")]
    stop = train[train.day >= "2018-07-11"]
    fit = train[train.day < "2018-07-11"]
    model = lgb.LGBMClassifier(
        n_estimators=2000, learning_rate=0.03, num_leaves=63, subsample=0.8,
        subsample_freq=1, colsample_bytree=0.8, verbose=-1, random_state=7,
    )
    model.fit(
        fit[features], fit.TX_FRAUD, eval_set=[(stop[features], stop.TX_FRAUD)],
        eval_metric="average_precision", callbacks=[lgb.early_stopping(100, verbose=False)],
    )

    # The test week, less each day's cards with a fraud from 07-25 to 8 days before it.
    parts = []
    for d in pd.date_range("2018-08-08", "2018-08-14"):
        known = set(df[(df.day >= "2018-07-25") & (df.day <= d - pd.Timedelta(days=DELAY + 1)) & (df.TX_FRAUD == 1)].CUSTOMER_ID)
        day = df[df.day == d]
        parts.append(day[~day.CUSTOMER_ID.isin(known)])
    test = pd.concat(parts).copy()
    test["score"] = model.predict_proba(test[features])[:, 1]
    print(f"LightGBM, the book's 15 features, trained 2018-05-01 .. 07-24 ({model.best_iteration_} trees)")
    print(f"test week: {len(test)} payments ({int(test.TX_FRAUD.sum())} fraud) after exclusions")
    print(
        f"AUC ROC {roc_auc_score(test.TX_FRAUD, test.score):.4f}, "
        f"average precision {average_precision_score(test.TX_FRAUD, test.score):.4f}, "
        f"card precision@100 {card_precision_at_k(test):.4f}"
    )


if __name__ == "__main__":
    main()
