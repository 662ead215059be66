//! Checks responses against the published OpenAPI document.

use std::sync::OnceLock;

use reqwest::{Method, StatusCode};
use serde_json::Value;

fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| serde_json::from_str(apikeys::http::OPENAPI_JSON).unwrap())
}

/// Follows a local `$ref`.
fn resolve(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => document().pointer(reference.trim_start_matches('#')).unwrap(),
        None => value,
    }
}

pub fn check(method: &Method, route: &str, status: StatusCode, body: &Value) {
    let operation = &document()["paths"][route][method.as_str().to_lowercase()];
    assert!(operation.is_object(), "{method} {route} is not in the OpenAPI document");
    let documented = &operation["responses"][status.as_str()];
    assert!(documented.is_object(), "{method} {route} answered {status}, which the OpenAPI document does not list");
    let documented = resolve(documented);
    match documented.pointer("/content/application~1json/schema") {
        Some(schema) => {
            let mut root = schema.clone();
            root["components"] = document()["components"].clone();
            let validator = jsonschema::draft202012::new(&root).unwrap();
            let errors: Vec<String> = validator.iter_errors(body).map(|error| error.to_string()).collect();
            assert!(errors.is_empty(), "{method} {route} {status}: body {body} does not match its schema: {errors:?}");
        }
        None => assert_eq!(body, &Value::Null, "{method} {route} {status} documents no body"),
    }
}
