// A benchmark that cannot build its fixture should stop at once, loudly.
#![allow(clippy::expect_used)]
//! Route lookup on a large snapshot (10,000 hosts × 10 routes), and the cost of building that
//! snapshot from YAML (load → validate → compile), which bounds how fast a reload can apply.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice_core::snapshot::{RequestInfo, RouteLookup, Snapshot};

/// The `sluice` binary's allocator: reload times depend on it (glibc's malloc spends half of a
/// full revalidation in its free-list management).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HOSTS: usize = 10_000;
const ROUTES: usize = 10;
const FILES: usize = 4;

/// Writes the config into a fresh directory, split into files under the per-file size limit.
fn write_config() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let head = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 8080, protocol: HTTP}\n    hosts: [\"*\"]\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: svc}\nspec:\n  hosts: [svc.test]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 127.0.0.1}]\n";
    let mut files = vec![head.to_string(); 1];
    files.resize(FILES, String::new());
    for host in 0..HOSTS {
        let routes: Vec<String> = (0..ROUTES)
            .map(|r| format!("{{match: [{{uri: {{prefix: /r{r}/}}}}], route: [{{destination: {{host: svc.test}}}}]}}"))
            .collect();
        let doc = format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: h{host}}}\nspec: {{hosts: [h{host}.bench.test], gateways: [gw], http: [{}]}}\n",
            routes.join(", ")
        );
        files[host % FILES].push_str(&doc);
    }
    for (i, text) in files.iter().enumerate() {
        std::fs::write(
            dir.join(format!("part{i}.yaml")),
            text.trim_start_matches("---\n"),
        )
        .expect("write");
    }
    dir
}

fn build(dir: &PathBuf) -> Snapshot {
    let loaded = sluice_core::load_paths(std::slice::from_ref(dir));
    let errors: Vec<String> = loaded.diagnostics.errors().map(|d| d.to_string()).collect();
    assert!(errors.is_empty(), "bench config invalid: {errors:?}");
    loaded.snapshot().expect("snapshot")
}

fn benches(c: &mut Criterion) {
    let dir = write_config();
    let snapshot = build(&dir);
    let headers = http::HeaderMap::new();
    // Each request hits a different host and the *last* route of it: the worst case of first-match.
    let requests: Vec<(String, String)> = (0..1024)
        .map(|i| {
            (
                format!("h{}.bench.test", (i * 7919) % HOSTS),
                format!("/r{}/item", ROUTES - 1),
            )
        })
        .collect();
    let mut next = 0usize;
    c.bench_function("route lookup, 10k hosts x 10 routes (last route)", |b| {
        b.iter(|| {
            let (host, path) = &requests[next % requests.len()];
            next += 1;
            let req = RequestInfo {
                method: "GET",
                scheme: "http",
                authority: host,
                path,
                query: None,
                headers: &headers,
                port: 8080,
            };
            let found = matches!(snapshot.route(black_box(&req)), RouteLookup::Found { .. });
            assert!(found);
        })
    });
    let mut group = c.benchmark_group("reload");
    group.sample_size(10);
    group.bench_function("load + validate + compile, 10k hosts x 10 routes", |b| {
        b.iter(|| black_box(build(&dir)))
    });
    // A reload after an operator edits one VirtualService of the 10,000: the caches keep every
    // other document's parse, validation and compiled routes.
    let mut cache = sluice_core::LoadCache::default();
    let loaded = sluice_core::load_paths_cached(std::slice::from_ref(&dir), &mut cache);
    black_box(loaded.snapshot_cached(&mut cache));
    let edited = dir.join("edited.yaml");
    let mut turn = 0u32;
    group.bench_function("reload after one edit (caches), 10k hosts x 10 routes", |b| {
        b.iter(|| {
            turn += 1;
            let doc = format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edited}}\n\
                 spec: {{hosts: [edited.bench.test], gateways: [gw], http: [{{match: [{{uri: {{prefix: /v{turn}/}}}}], route: [{{destination: {{host: svc.test}}}}]}}]}}\n"
            );
            std::fs::write(&edited, doc).expect("write");
            let loaded = sluice_core::load_paths_cached(std::slice::from_ref(&dir), &mut cache);
            black_box(loaded.snapshot_cached(&mut cache).expect("snapshot"))
        })
    });
    // Absent when a filter skipped the bench above.
    let _ = std::fs::remove_file(&edited);
    // An edit of the service every VirtualService routes to (a new DestinationRule subset): only
    // what looked up a changed entry is validated again; parses and compiled routes come from the
    // caches.
    let rule = dir.join("rule.yaml");
    group.bench_function("reload after a DestinationRule edit (caches), 10k hosts x 10 routes", |b| {
        b.iter(|| {
            turn += 1;
            let doc = format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc}}\n\
                 spec: {{host: svc.test, subsets: [{{name: v{turn}, labels: {{version: v{turn}}}}}]}}\n"
            );
            std::fs::write(&rule, doc).expect("write");
            let loaded = sluice_core::load_paths_cached(std::slice::from_ref(&dir), &mut cache);
            black_box(loaded.snapshot_cached(&mut cache).expect("snapshot"))
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(lookup, benches);
criterion_main!(lookup);
