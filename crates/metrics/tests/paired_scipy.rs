//! The Wilcoxon signed-rank p-values of the paired comparison against scipy
//! (`scripts/fixtures/paired_fixtures.py`, `fixtures/wilcoxon.json`): exact, sign-flip and normal
//! approximation cases.

use cwseg_metrics::wilcoxon_signed_rank;

#[test]
fn wilcoxon_p_values_match_scipy() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wilcoxon.json");
    let text = std::fs::read_to_string(path).expect("fixture");
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let cases = fixture["cases"].as_object().expect("cases");
    assert!(cases.len() >= 8);
    for (name, case) in cases {
        let d: Vec<f64> = case["differences"]
            .as_array()
            .expect("differences")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        let want = case["p_value"].as_f64().expect("p");
        let got = wilcoxon_signed_rank(&d);
        assert!(
            (got - want).abs() <= 1e-9 * want.max(1e-300) + 1e-15,
            "{name}: p = {got}, scipy {want}"
        );
    }
}
