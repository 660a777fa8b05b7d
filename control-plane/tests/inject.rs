//! `tern-inject` as a user runs it: manifests in, injected manifests out.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tern-inject");

fn example() -> String {
    format!(
        "{}/../deploy/kubernetes/app.yaml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn run(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn the_example_app_comes_out_with_the_sidecar_and_everything_else_as_it_was() {
    let (code, stdout, stderr) = run(&["-f", &example(), "--trust-domain", "prod.example"], None);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("injected Deployment web"), "{stderr}");
    assert!(
        stderr.contains("skipped Service web: runs no pods"),
        "{stderr}"
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&stdout).unwrap();
    let original: Vec<Value> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(example()).unwrap()).unwrap();
    assert_eq!(docs.len(), 3, "{stdout}");
    assert_eq!(docs[0], original[0], "the ServiceAccount passes through");
    assert_eq!(docs[1], original[1], "the Service passes through");
    let spec = &docs[2]["spec"]["template"]["spec"];
    let init: Vec<&str> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["tern-init", "tern-proxy"]);
    assert_eq!(
        spec["containers"], original[2]["spec"]["template"]["spec"]["containers"],
        "the app container is untouched (a quoted \"8080\" stays a string)"
    );
    assert_eq!(spec["containers"][0]["env"][0]["value"], "8080");
    assert!(
        stdout.contains(
            "--identity=spiffe://prod.example/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"
        ),
        "{stdout}"
    );

    // The output is input again: injecting it twice changes nothing.
    let (code, again, stderr) = run(
        &["-f", "-", "--trust-domain", "prod.example"],
        Some(&stdout),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("skipped Deployment web: already has a tern-proxy container"),
        "{stderr}"
    );
    let twice: Vec<Value> = serde_saphyr::from_multiple(&again).unwrap();
    assert_eq!(twice, docs);
}

#[test]
fn bad_input_is_refused_with_the_document_and_field_named_and_nothing_written() {
    let broken = "kind: Service\nmetadata: { name: a }\n---\nkind: Deployment\nmetadata: { name: web }\nspec: {}\n";
    let (code, stdout, stderr) = run(&[], Some(broken));
    assert_eq!(code, 2);
    assert_eq!(
        stdout, "",
        "nothing is written when one document is refused"
    );
    assert!(
        stderr.contains("stdin: document 2: Deployment web: /spec/template must be present"),
        "{stderr}"
    );
    let (code, stdout, stderr) = run(&[], Some("kind: [unclosed\n"));
    assert_eq!(code, 2);
    assert_eq!(stdout, "");
    assert!(stderr.contains("not YAML"), "{stderr}");
}
