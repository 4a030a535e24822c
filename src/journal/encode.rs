//! How a decision's feature vector and reasons become journal text: JSON, written straight
//! into buffers the writer thread keeps (no allocation per row), as short as it can be while
//! every value reads back bit for bit.
//!
//! Features: a whole number (most of them are counts and flags) is written as an integer,
//! `0` rather than `0.0`; any other value in the shortest form that reads back exactly
//! (`zmij`, as `serde_json` itself uses). A non-finite value, which cannot occur, would be
//! `null`, as before. Reasons: the same objects `serde_json` wrote before, strings escaped
//! by `serde_json`.

use crate::domain::Reason;
use crate::features::FeatureVector;

/// Reused text buffers, one set per writer thread.
#[derive(Default)]
pub struct Buffers {
    features: String,
    reasons: String,
    event_time: String,
    float: zmij::Buffer,
    int: itoa::Buffer,
}

impl std::fmt::Debug for Buffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffers").finish_non_exhaustive()
    }
}

impl Buffers {
    /// `features` as a JSON array, in FEATURES order.
    pub fn features(&mut self, features: &FeatureVector) -> &str {
        let out = &mut self.features;
        out.clear();
        out.push('[');
        for (i, &v) in features.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_number(out, &mut self.float, &mut self.int, v);
        }
        out.push(']');
        out
    }

    /// `reasons` as a JSON array of `{code, feature, value, contribution, text}`.
    pub fn reasons(&mut self, reasons: &[Reason]) -> &str {
        let out = &mut self.reasons;
        out.clear();
        out.push('[');
        for (i, r) in reasons.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"code\":");
            push_string(out, r.code);
            out.push_str(",\"feature\":");
            push_string(out, &r.feature);
            out.push_str(",\"value\":");
            push_float(out, &mut self.float, r.value);
            out.push_str(",\"contribution\":");
            push_float(out, &mut self.float, r.contribution);
            out.push_str(",\"text\":");
            push_string(out, &r.text);
            out.push('}');
        }
        out.push(']');
        out
    }

    /// An event time as RFC 3339 in UTC (`2025-01-01T00:00:00Z`, with the fraction when
    /// there is one); empty when out of range.
    pub fn event_time(&mut self, seconds: i64, nanos: i32) -> &str {
        self.event_time.clear();
        if let Some(t) = chrono::DateTime::from_timestamp(seconds, nanos as u32) {
            // chrono's RFC 3339 writer, several times quicker than a format string.
            self.event_time
                .push_str(&t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        }
        &self.event_time
    }
}

/// A whole number as an integer, anything else as the shortest exact float.
fn push_number(out: &mut String, float: &mut zmij::Buffer, int: &mut itoa::Buffer, v: f64) {
    // Exactly representable as an i64 and back, sign of zero included.
    let whole = v as i64;
    if (whole as f64).to_bits() == v.to_bits() && whole.unsigned_abs() < 1 << 53 {
        out.push_str(int.format(whole));
    } else {
        push_float(out, float, v);
    }
}

fn push_float(out: &mut String, float: &mut zmij::Buffer, v: f64) {
    if v.is_finite() {
        out.push_str(float.format_finite(v));
    } else {
        out.push_str("null");
    }
}

fn push_string(out: &mut String, s: &str) {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        // Rare (an analyst's rule description, say): serde_json escapes it.
        out.push_str(&serde_json::Value::from(s).to_string());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::N_FEATURES;
    use std::borrow::Cow;

    #[test]
    fn features_read_back_bit_for_bit() {
        let mut f: FeatureVector = [0.0; N_FEATURES];
        let values = [
            0.0,
            -0.0,
            1.0,
            64.0,
            -3.0,
            0.1,
            3.4759955917373415,
            1e300,
            -2.5e-308,
            9_007_199_254_740_993.0,
            f64::MIN_POSITIVE,
        ];
        for (slot, v) in f.iter_mut().zip(values) {
            *slot = v;
        }
        let mut b = Buffers::default();
        let text = b.features(&f).to_owned();
        assert!(
            text.starts_with("[0,-0.0,1,64,-3,0.1,3.4759955917373415,"),
            "{text}"
        );
        let back: Vec<f64> = serde_json::from_str(&text).expect("JSON");
        assert_eq!(back.len(), N_FEATURES);
        for (a, b) in f.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
        }
    }

    #[test]
    fn reasons_are_the_json_serde_wrote() {
        let reasons = [
            Reason {
                code: "RULE",
                feature: Cow::Owned("r\"1".into()),
                value: 1.0,
                contribution: 0.25,
                text: Cow::Owned("a \\ quote \" and <b>\n".into()),
            },
            Reason {
                code: "ANOMALY",
                feature: Cow::Borrowed("anomaly_score"),
                value: 0.9105058365758755,
                contribution: 0.04552529182879378,
                text: Cow::Borrowed("unusual compared with recent traffic"),
            },
        ];
        let mut b = Buffers::default();
        let ours: serde_json::Value = serde_json::from_str(b.reasons(&reasons)).expect("JSON");
        let theirs = serde_json::json!([
            {"code": "RULE", "feature": "r\"1", "value": 1.0, "contribution": 0.25,
             "text": "a \\ quote \" and <b>\n"},
            {"code": "ANOMALY", "feature": "anomaly_score", "value": 0.9105058365758755,
             "contribution": 0.04552529182879378, "text": "unusual compared with recent traffic"},
        ]);
        assert_eq!(ours, theirs);
        assert_eq!(b.reasons(&[]), "[]");
    }

    #[test]
    fn event_times_are_rfc3339() {
        let mut b = Buffers::default();
        assert_eq!(b.event_time(1_735_689_600, 0), "2025-01-01T00:00:00Z");
        assert_eq!(
            b.event_time(1_735_689_600, 5_000_000),
            "2025-01-01T00:00:00.005Z"
        );
        for (s, n) in [
            (0, 1),
            (1_735_689_600, 123_456_000),
            (-86_400, 999_999_999),
            (2, 10),
        ] {
            let t = chrono::DateTime::from_timestamp(s, n).expect("in range");
            let chrono_says = t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            assert_eq!(b.event_time(s, n as i32), chrono_says);
        }
    }
}
