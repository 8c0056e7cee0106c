#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let mut texts = vec![];
    for e in std::fs::read_dir(&dir).unwrap() {
        texts.push(std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    let t = Instant::now();
    let mut n = 0;
    for text in &texts {
        let f = sluice_core::source::SourceFile::new("x", text.clone());
        n += f.documents().len();
    }
    println!("split: {:?} ({n} docs)", t.elapsed());
    let t = Instant::now();
    let t = Instant::now();
    for text in &texts {
        let f = sluice_core::source::SourceFile::new("x", text.clone());
        for d in 0..f.documents().len() {
            let _: serde_yaml::Value = serde_yaml::from_str(f.document_text(d)).unwrap();
        }
    }
    println!("split+serde Value: {:?}", t.elapsed());
    let t = Instant::now();
    let (set, _) = sluice_core::config::ConfigSet::load_paths(&[dir.clone()]);
    println!("load_paths: {:?}", t.elapsed());
    let t = Instant::now();
    let mut d = sluice_core::diag::Diagnostics::default();
    let model = sluice_core::validate::validate(&set, &mut d).unwrap();
    println!("validate: {:?}", t.elapsed());
    let t = Instant::now();
    let _s = sluice_core::snapshot::Snapshot::compile(&model);
    println!("compile: {:?}", t.elapsed());
}
