//! The backtest's files: `report.md` for people, `report.json` for programs, `scores.csv`
//! (every answer of the evaluation period), and two plots as SVG (plotters): the
//! precision-recall curve and the score histogram by label.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::figures::BacktestReport;
use super::Answered;

/// Writes every file into `dir` (created if missing).
pub fn write(dir: &Path, report: &BacktestReport, answers: &[&Answered]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).context("encoding the report")?;
    std::fs::write(dir.join("report.json"), json).context("writing report.json")?;
    std::fs::write(dir.join("report.md"), markdown(report)).context("writing report.md")?;
    let mut csv = csv::Writer::from_path(dir.join("scores.csv")).context("creating scores.csv")?;
    csv.write_record([
        "transaction_id",
        "account_id",
        "event_time",
        "label",
        "score",
        "decision",
        "latency_us",
    ])?;
    for a in answers {
        csv.write_record([
            a.transaction_id.as_str(),
            a.account_id.as_str(),
            &a.event_time.to_string(),
            if a.fraud { "1" } else { "0" },
            &a.score.to_string(),
            a.decision.as_str_name(),
            &a.latency.as_micros().to_string(),
        ])?;
    }
    csv.flush().context("writing scores.csv")?;
    pr_curve(&dir.join("pr_curve.svg"), answers)?;
    histogram(&dir.join("score_histogram.svg"), answers)?;
    Ok(())
}

fn markdown(r: &BacktestReport) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Backtest\n");
    let _ = writeln!(
        md,
        "Evaluation period {} to {}: {} transactions, {} fraud.\n",
        r.period[0], r.period[1], r.rows, r.frauds
    );
    let _ = writeln!(md, "| metric | value |\n|---|---|");
    let _ = writeln!(md, "| AUC ROC | {:.4} |", r.auc_roc);
    let _ = writeln!(md, "| average precision | {:.4} |", r.average_precision);
    let _ = writeln!(
        md,
        "| card precision@{} (mean over {} days) | {:.4} |",
        r.k,
        r.card_precision_by_day.len(),
        r.card_precision_at_k
    );
    let _ = writeln!(
        md,
        "| latency p50 / p90 / p99 / max (us, ScoreStream) | {} / {} / {} / {} |\n",
        r.latency.p50_us, r.latency.p90_us, r.latency.p99_us, r.latency.max_us
    );
    let _ = writeln!(
        md,
        "| decision | count | fraud | precision | recall |\n|---|---|---|---|---|"
    );
    for d in &r.decisions {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.4} | {:.4} |",
            d.decision, d.count, d.frauds, d.precision, d.recall
        );
    }
    let _ = writeln!(
        md,
        "\n![precision-recall curve](pr_curve.svg)\n\n![score histogram by label](score_histogram.svg)"
    );
    md
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

/// Precision against recall, one point per distinct score (ties taken together).
fn pr_curve(path: &Path, answers: &[&Answered]) -> anyhow::Result<()> {
    let total = answers.iter().filter(|a| a.fraud).count().max(1);
    let mut sorted: Vec<&&Answered> = answers.iter().collect();
    sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
    let (mut tp, mut seen, mut points) = (0usize, 0usize, Vec::new());
    let mut i = 0;
    while i < sorted.len() {
        let s = sorted[i].score;
        while i < sorted.len() && sorted[i].score == s {
            tp += usize::from(sorted[i].fraud);
            seen += 1;
            i += 1;
        }
        points.push((tp as f64 / total as f64, tp as f64 / seen as f64));
    }
    let root = SVGBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("precision-recall", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.05f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(points, &BLUE))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Scores in 20 bins, the share of each label's transactions per bin.
fn histogram(path: &Path, answers: &[&Answered]) -> anyhow::Result<()> {
    const BINS: usize = 20;
    let mut counts = [[0usize; BINS]; 2];
    for a in answers {
        let bin = ((a.score * BINS as f64) as usize).min(BINS - 1);
        counts[usize::from(a.fraud)][bin] += 1;
    }
    let shares: Vec<Vec<f64>> = counts
        .iter()
        .map(|c| {
            let n = c.iter().sum::<usize>().max(1) as f64;
            c.iter().map(|&x| x as f64 / n).collect()
        })
        .collect();
    let root = SVGBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("score by label (share of each label)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("score")
        .y_desc("share")
        .draw()
        .map_err(plot_error)?;
    let width = 1.0 / BINS as f64;
    for (label, (share, color)) in [
        ("legitimate", (&shares[0], GREEN)),
        ("fraud", (&shares[1], RED)),
    ] {
        chart
            .draw_series(share.iter().enumerate().map(|(i, &s)| {
                let x0 = i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, s)], color.mix(0.5).filled())
            }))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
