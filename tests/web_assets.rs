//! The browser side of sealed collection as shipped: the fields page pins
//! its script by Subresource Integrity, the published hashes in
//! `docs/collect.md` are the files' current ones, and nothing is loaded
//! from another origin at run time.

use std::path::{Path, PathBuf};

use base64::Engine;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sri(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA384, &bytes);
    format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn the_fields_page_pins_its_script_by_integrity() {
    let html = std::fs::read_to_string(root().join("web/fields.html")).unwrap();
    let want = sri(&root().join("web/fields.js"));
    assert!(
        html.contains(&format!("src=\"fields.js\" integrity=\"{want}\"")),
        "web/fields.html must pin fields.js with integrity=\"{want}\""
    );
}

#[test]
fn the_published_hashes_are_current() {
    let doc = std::fs::read_to_string(root().join("docs/collect.md")).unwrap();
    for f in ["collect.js", "fields.js"] {
        let want = sri(&root().join("web").join(f));
        assert!(
            doc.contains(&format!("`{f}` | `{want}`")),
            "docs/collect.md must publish `{f}` | `{want}`"
        );
    }
}

#[test]
fn nothing_is_loaded_from_another_origin() {
    let mut all = Vec::new();
    files(&root().join("web"), &mut all);
    assert!(all.len() > 10);
    for p in all {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !["js", "html", "css"].contains(&ext) {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for line in text.lines() {
            let t = line.trim_start();
            let code = !(t.starts_with("//") || t.starts_with('*') || t.starts_with("/*"));
            let remote = [
                "from \"http",
                "from 'http",
                "import(\"http",
                "src=\"http",
                "href=\"http",
                "url(http",
            ]
            .iter()
            .any(|pat| t.contains(pat));
            assert!(
                !(code && remote),
                "{}: loads from another origin: {t}",
                p.display()
            );
        }
    }
}
