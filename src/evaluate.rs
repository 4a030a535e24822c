//! How a model is judged: AUC ROC, average precision (scikit-learn's definitions, ties taken
//! together), the threshold that reaches a precision, quantiles. Shared by `train`, the
//! retraining of a challenger and the backtests, so all three measure alike.

use crate::model::Quality;

/// Area under the ROC curve (smartcore) and average precision.
pub fn metrics(scores: &[f64], truth: &[bool]) -> Quality {
    let frauds = truth.iter().filter(|&&t| t).count();
    let y: Vec<f64> = truth.iter().map(|&t| f64::from(t)).collect();
    let auc_roc = if frauds == 0 || frauds == truth.len() {
        f64::NAN
    } else {
        smartcore::metrics::roc_auc_score(&y, &scores.to_vec())
    };
    Quality {
        rows: truth.len(),
        frauds,
        auc_roc,
        average_precision: average_precision(scores, truth),
    }
}

/// Every distinct score, highest first, with the frauds and payments scored at or above it:
/// the cut points both [`average_precision`] and [`threshold_for_precision`] walk (tied
/// scores taken together, as scikit-learn does).
fn cuts(scores: &[f64], truth: &[bool]) -> Vec<(f64, usize, usize)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut seen, mut out) = (0usize, 0usize, Vec::new());
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            tp += usize::from(truth[order[i]]);
            seen += 1;
            i += 1;
        }
        out.push((s, tp, seen));
    }
    out
}

/// Average precision: the mean, over frauds, of the precision at the score of each fraud
/// (tied scores are taken together, as scikit-learn does).
pub fn average_precision(scores: &[f64], truth: &[bool]) -> f64 {
    let total = truth.iter().filter(|&&t| t).count();
    if total == 0 {
        return f64::NAN;
    }
    let (mut ap, mut last_recall) = (0.0, 0.0);
    for (_, tp, seen) in cuts(scores, truth) {
        let recall = tp as f64 / total as f64;
        ap += (recall - last_recall) * (tp as f64 / seen as f64);
        last_recall = recall;
    }
    ap
}

/// The lowest threshold at which the payments scored at or above it are at least `precision`
/// fraud (1.0, i.e. never, if no threshold reaches it).
pub fn threshold_for_precision(scores: &[f64], truth: &[bool], precision: f64) -> f64 {
    let mut best = 1.0f64;
    for (s, tp, seen) in cuts(scores, truth) {
        if tp as f64 >= precision * seen as f64 && tp > 0 {
            best = s;
        }
    }
    best
}

/// The `q` quantile of `values` (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank =
        ((sorted.len() as f64 * q.clamp(0.0, 1.0)) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(rank).copied().unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_precision_matches_hand_computation() {
        // Ranked: 0.9 F, 0.8 L, 0.7 F, 0.1 L -> AP = (1/1 + 2/3) / 2.
        let ap = average_precision(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]);
        assert!((ap - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        let m = metrics(&[0.9, 0.8, 0.7, 0.1], &[true, false, true, false]);
        assert!((m.auc_roc - 0.75).abs() < 1e-12, "auc {}", m.auc_roc);
    }

    #[test]
    fn threshold_for_precision_picks_the_deepest_cut() {
        let scores = [0.9, 0.8, 0.7, 0.6, 0.5];
        let truth = [true, true, false, true, false];
        assert_eq!(threshold_for_precision(&scores, &truth, 1.0), 0.8);
        assert_eq!(threshold_for_precision(&scores, &truth, 0.75), 0.6);
        assert_eq!(threshold_for_precision(&scores, &truth, 0.5), 0.5);
    }
}
