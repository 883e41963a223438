//! Exported models carry their provenance: the source's `general.*` keys survive GGUF and HF
//! export, every written GGUF has the `general.file_type` llama.cpp expects, the model card is
//! YAML with the fields the Hub reads, and recipes and figures come back on reload.

mod common;

use common::tiny_model;
use whittle::io::gguf::{self, GgufFile, GgufType};
use whittle::model::provenance::{Figure, MetaValue, Number, Provenance};
use whittle::recipe::{CalibSpec, Recipe, Stage};

/// The default model's metadata, as its own GGUF file has it (header only: no tensor is read).
fn default_model_general() -> Provenance {
    let path = whittle::io::fetch::default_model().unwrap();
    let f = GgufFile::open(&path).unwrap();
    whittle::io::gguf_provenance::read(f.metadata())
}

fn recipe() -> String {
    let stage = Stage::Sparsify(whittle::recipe::Sparsify {
        method: "sparsegpt".into(),
        pattern: "2:4".into(),
        targets: vec![],
        mask: None,
    });
    Recipe::single(CalibSpec::default(), stage)
        .to_toml()
        .unwrap()
}

fn figures() -> Vec<Figure> {
    vec![
        Figure {
            task: "wikitext2-test".into(),
            metric: "ppl".into(),
            value: 85.31,
            stderr: None,
            setting: "2048-token windows".into(),
        },
        Figure {
            task: "piqa".into(),
            metric: "acc".into(),
            value: 0.6431,
            stderr: Some(0.0112),
            setting: "0-shot".into(),
        },
    ]
}

/// A tiny model that carries the default model's provenance plus one whittle run.
fn tiny_with_provenance() -> whittle::Model {
    let mut m = tiny_model(3);
    m.provenance = default_model_general();
    m.provenance
        .set_source("HuggingFaceTB/SmolLM2-135M-Instruct");
    m.provenance.record_run(recipe(), figures());
    m
}

#[test]
fn the_source_declares_what_the_export_must_keep() {
    let p = default_model_general();
    assert_eq!(p.license(), Some("apache-2.0"));
    assert_eq!(p.languages(), vec!["en".to_string()]);
    assert_eq!(p.text("general.organization"), Some("HuggingFaceTB"));
    assert_eq!(
        p.general.get("general.file_type"),
        Some(&MetaValue::Number(Number::U32(3)))
    );
    assert_eq!(p.general.len(), 11, "{:?}", p.general.keys());
}

/// gguf-py's `LlamaFileType` values (gguf/constants.py), written out here rather than taken
/// from whittle's own table.
const LLAMA_FILE_TYPES: [(GgufType, u32); 6] = [
    (GgufType::F32, 0),
    (GgufType::F16, 1),
    (GgufType::Q4_0, 2),
    (GgufType::Q4_1, 3),
    (GgufType::Q8_0, 7),
    (GgufType::BF16, 32),
];

#[test]
fn gguf_export_keeps_every_general_key_and_sets_the_file_type() {
    let model = tiny_with_provenance();
    let source = &model.provenance;
    let dir = tempfile::tempdir().unwrap();
    for (dtype, ftype) in LLAMA_FILE_TYPES {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        gguf::save(&model, None, dtype, &path).unwrap();
        let (back, _) = gguf::load(&path).unwrap();
        let p = &back.provenance;
        let rewritten = [
            "general.file_type",
            "general.quantization_version",
            "general.size_label",
        ];
        for (k, v) in &source.general {
            if !rewritten.contains(&k.as_str()) {
                assert_eq!(p.general.get(k), Some(v), "{dtype:?}: {k}");
            }
        }
        assert_eq!(
            p.general["general.file_type"],
            MetaValue::Number(Number::U32(ftype)),
            "{dtype:?}"
        );
        assert_eq!(
            p.general["general.quantization_version"],
            MetaValue::Number(Number::U32(2))
        );
        // The tiny model has 3 × ~9.2 K + 8.3 K parameters: a pruned model gets its own label.
        let label = whittle::model::provenance::size_label(model.n_params());
        assert_eq!(p.text("general.size_label"), Some(label.as_str()));
        assert!(label.ends_with('K'), "{label}");
        assert_eq!(p.base_model, source.base_model);
        assert_eq!(p.recipes, source.recipes);
        assert_eq!(p.figures, source.figures);
    }
}

#[test]
fn hf_export_writes_a_model_card_recipe_and_provenance_that_reload() {
    let model = tiny_with_provenance();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    whittle::io::safetensors::save(&model, None, false, &out).unwrap();
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let yaml = card
        .strip_prefix("---\n")
        .and_then(|r| r.split_once("\n---\n"))
        .map(|(h, _)| h)
        .expect("front matter");
    let header: serde_json::Value = serde_norway::from_str(yaml).unwrap();
    assert_eq!(header["license"], "apache-2.0");
    assert_eq!(header["base_model"], "HuggingFaceTB/SmolLM2-135M-Instruct");
    assert_eq!(header["language"][0], "en");
    assert_eq!(header["library_name"], "transformers");
    let tags: Vec<&str> = header["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tags, ["whittle", "sparsify", "sparsegpt"]);
    let results = &header["model-index"][0]["results"];
    assert_eq!(results[0]["metrics"][0]["type"], "ppl");
    assert_eq!(results[0]["metrics"][0]["value"], 85.31);
    assert_eq!(results[1]["dataset"]["type"], "piqa");
    assert!(card.contains("```toml\n[calib]"), "{card}");
    let replay = Recipe::from_file(&out.join("recipe.toml")).unwrap();
    assert_eq!(replay.stages.len(), 1);
    assert!(out.join("generation_config.json").is_file());
    let back = whittle::io::safetensors::load(&out).unwrap();
    assert_eq!(back.provenance, model.provenance);
}

#[test]
fn an_hf_source_folder_describes_itself_through_its_card() {
    let model = tiny_model(4);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    whittle::io::safetensors::save(&model, None, false, &src).unwrap();
    // Make it look like a folder from the Hub: its own card and generation config, no whittle.json.
    std::fs::remove_file(src.join("whittle.json")).unwrap();
    std::fs::write(
        src.join("README.md"),
        "---\nlicense: mit\nlanguage:\n- en\n- fr\nbase_model: org/parent-1B\nmodel_name: Tiny\n---\n# Tiny\n",
    )
    .unwrap();
    let generation = "{\"do_sample\": true, \"temperature\": 0.2}";
    std::fs::write(src.join("generation_config.json"), generation).unwrap();
    let p = whittle::io::safetensors::load(&src).unwrap().provenance;
    assert_eq!(p.license(), Some("mit"));
    assert_eq!(p.languages(), vec!["en".to_string(), "fr".to_string()]);
    assert_eq!(p.text("general.name"), Some("Tiny"));
    assert_eq!(p.text("general.base_model.0.organization"), Some("org"));
    assert_eq!(
        p.text("general.base_model.0.repo_url"),
        Some("https://huggingface.co/org/parent-1B")
    );
    // HF → HF keeps the generation config verbatim; HF → GGUF keeps the card's keys.
    let mut m = whittle::io::safetensors::load(&src).unwrap();
    m.provenance.set_source("src");
    let out = dir.path().join("out");
    whittle::io::safetensors::save(&m, None, false, &out).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
        generation
    );
    let g = dir.path().join("out.gguf");
    gguf::save(&m, None, GgufType::Q8_0, &g).unwrap();
    let back = gguf::load(&g).unwrap().0.provenance;
    assert_eq!(back.license(), Some("mit"));
    assert_eq!(back.base_model.as_deref(), Some("src"));
}

#[test]
fn recipes_round_trip_through_toml() {
    let text = recipe();
    let r: Recipe = toml::from_str(&text).unwrap();
    assert_eq!(r.stages.len(), 1);
    assert_eq!(
        Recipe::describe_toml(&text),
        vec!["sparsify sparsegpt 2:4".to_string()]
    );
    let budget = Stage::Compensate(whittle::recipe::Compensate {
        method: "eora".into(),
        rank: whittle::recipe::DEFAULT_RANK,
        rank_budget: Some(5_000_000),
        fold: false,
        targets: vec!["q_proj".into()],
    });
    let text = Recipe::single(CalibSpec::default(), budget)
        .to_toml()
        .unwrap();
    assert_eq!(
        Recipe::describe_toml(&text),
        vec!["compensate eora budget 5000000".to_string()]
    );
}
