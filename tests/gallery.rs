//! The gallery page is up to date with the corpus: every kernel of `examples/` has an entry, and
//! the committed page and pictures are what `scripts/gallery.sh` makes now.

use std::path::Path;

#[test]
fn the_gallery_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let gallery = einfuse::gallery::build(&root.join("examples")).unwrap();
    let committed = std::fs::read_to_string(root.join("docs/gallery.md")).unwrap_or_default();
    for (_, kernel) in std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ein"))
        .flat_map(|p| einfuse::Program::from_file(&p).unwrap().kernels.into_iter().map(move |k| (p.clone(), k)))
    {
        assert!(committed.contains(&format!("\n### {}\n", kernel.name)), "kernel {} has no gallery entry", kernel.name);
    }
    for (picture, _) in &gallery.pictures {
        assert!(root.join(format!("docs/gallery/{picture}.svg")).exists(), "docs/gallery/{picture}.svg is missing");
    }
    assert!(committed == gallery.markdown, "docs/gallery.md is stale: run `bash scripts/gallery.sh` and commit");
}
