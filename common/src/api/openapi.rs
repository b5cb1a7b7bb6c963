//! The OpenAPI 3.1 document (`GET /openapi.json`, `docs/openapi.json`) and the generated
//! per-operation reference of `docs/api.md`, both built from [`CATALOGUE`] and the contract
//! types, so neither can drift from the code.

use schemars::SchemaGenerator;
use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use super::{CATALOGUE, OpSpec};

/// Where the generated reference starts and ends in `docs/api.md`.
pub const REFERENCE_BEGIN: &str = "<!-- BEGIN GENERATED REFERENCE: do not edit; change the contracts in common/src/api and run AF_UPDATE_DOCS=1 cargo nextest run -p tests -E 'test(contracts_docs)' -->";
pub const REFERENCE_END: &str = "<!-- END GENERATED REFERENCE -->";

/// Arguments and result schemas of every operation, with the shared definitions.
struct Schemas {
    ops: Vec<(&'static OpSpec, Value, Value)>,
    definitions: Map<String, Value>,
}

fn schemas() -> Schemas {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator: SchemaGenerator = settings.into_generator();
    let ops = CATALOGUE
        .iter()
        .map(|spec| {
            let args = (spec.args_schema)(&mut generator).to_value();
            let result = (spec.result_schema)(&mut generator).to_value();
            (spec, args, result)
        })
        .collect();
    Schemas { ops, definitions: generator.take_definitions(true) }
}

/// The OpenAPI 3.1 document of every operation.
pub fn document() -> Value {
    let Schemas { ops, definitions } = schemas();
    let mut paths = Map::new();
    for (spec, args, result) in ops {
        let roles: Vec<&str> = spec.roles.iter().map(|r| r.as_str()).collect();
        let mut description = format!("Served by {}. Roles: {}.", spec.service.as_str(), roles.join(", "));
        if spec.long_poll {
            description.push_str(" Long poll: the request is held for up to its `waitMs`.");
        }
        let error = |text: &str| json!({ "$ref": format!("#/components/responses/{text}") });
        paths.insert(
            format!("/v1/ops/{}", spec.name),
            json!({
                "post": {
                    "operationId": spec.name,
                    "summary": spec.summary,
                    "description": description,
                    "tags": [spec.service.as_str()],
                    "x-roles": roles,
                    "x-long-poll": spec.long_poll,
                    "requestBody": {
                        "required": true,
                        "content": { "application/json": { "schema": args } },
                    },
                    "responses": {
                        "200": {
                            "description": "The operation's result.",
                            "content": { "application/json": { "schema": result } },
                        },
                        "400": error("InvalidInput"),
                        "401": error("Unauthenticated"),
                        "403": error("Forbidden"),
                        "404": error("NotFound"),
                        "409": error("Conflict"),
                        "413": error("PayloadTooLarge"),
                        "429": error("RateLimited"),
                        "503": error("Unavailable"),
                    },
                }
            }),
        );
    }
    let mut schemas = definitions;
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {
                            "type": "string",
                            "enum": ["invalid_input", "unauthenticated", "forbidden", "not_found", "conflict",
                                     "payload_too_large", "rate_limited", "unavailable", "internal"],
                        },
                        "message": { "type": "string" },
                    },
                },
            },
        }),
    );
    let mut responses = Map::new();
    for (name, text) in [
        ("InvalidInput", "Invalid arguments (the message names the field)."),
        ("Unauthenticated", "Missing or unknown bearer token."),
        ("Forbidden", "The caller's role may not call this operation, or not for this resource."),
        ("NotFound", "Unknown operation, or a missing resource the operation needs."),
        ("Conflict", "The state changed or does not allow this (the original's error string)."),
        ("PayloadTooLarge", "The request exceeds a size limit."),
        ("RateLimited", "Too many requests; retry later."),
        ("Unavailable", "The owning service is not reachable right now; retry."),
    ] {
        responses.insert(
            name.into(),
            json!({
                "description": text,
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
            }),
        );
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "agent-factory operations",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every operation is `POST /v1/ops/<name>` with JSON arguments and `Authorization: Bearer <token>`; the same operations are served over NATS on `af.op.<name>`.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": responses,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}

/// The generated part of `docs/api.md`: the catalogue table and, per operation, its roles and
/// its argument and result types, with the shared types after them.
pub fn reference_markdown() -> String {
    let Schemas { ops, definitions } = schemas();
    let mut out = String::new();
    out.push_str("## Catalogue\n\nEach name links to its guide section above; the arguments and result tables follow the catalogue.\n\n| operation | service | roles | long poll | summary |\n|---|---|---|---|---|\n");
    for (spec, ..) in &ops {
        out.push_str(&format!(
            "| [`{name}`](#{anchor}) | {service} | {roles} | {poll} | {summary} |\n",
            name = spec.name,
            anchor = spec.name.to_lowercase(),
            service = spec.service.as_str(),
            roles = roles(spec),
            poll = if spec.long_poll { "yes" } else { "" },
            summary = spec.summary,
        ));
    }
    out.push_str("\n## Reference\n\nArguments and results of every operation, generated from the contract types. ");
    out.push_str("An argument marked *ignored* is the original's, accepted for compatibility and not honoured; ");
    out.push_str("its description says which weak spot of the original requires that.\n");
    for (spec, args, result) in &ops {
        out.push_str(&format!(
            "\n### `{}`: arguments and result\n\n{}. Service: {}. Roles: {}.",
            spec.name,
            capitalise(spec.summary),
            spec.service.as_str(),
            roles(spec)
        ));
        if spec.long_poll {
            out.push_str(" Long poll: held for up to `waitMs`.");
        }
        out.push_str("\n\n");
        out.push_str(&fields_table(args, &definitions, "Arguments"));
        out.push_str(&format!("Result: {}\n", type_name(result)));
    }
    out.push_str("\n## Types\n\nThe named types that arguments and results refer to.\n");
    for (name, schema) in &definitions {
        out.push_str(&format!("\n### {name}\n\n"));
        if let Some(text) = schema.get("description").and_then(Value::as_str) {
            out.push_str(&one_line(text));
            out.push_str("\n\n");
        }
        if schema.get("properties").is_some() {
            out.push_str(&fields_table(schema, &definitions, "Fields"));
        } else {
            out.push_str(&format!("{}\n", type_name(&without_description(schema))));
        }
    }
    out
}

/// Puts the generated reference between the markers of `current` (the text of `docs/api.md`).
pub fn splice_reference(current: &str) -> Option<String> {
    let start = current.find(REFERENCE_BEGIN)? + REFERENCE_BEGIN.len();
    let end = current.find(REFERENCE_END)?;
    (start <= end).then(|| format!("{}\n\n{}\n{}", &current[..start], reference_markdown(), &current[end..]))
}

fn roles(spec: &OpSpec) -> String {
    spec.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

fn without_description(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(map) = schema.as_object_mut() {
        map.remove("description");
    }
    schema
}

/// A table of an object schema's properties (following a `$ref` to it), or "none".
fn fields_table(schema: &Value, definitions: &Map<String, Value>, title: &str) -> String {
    let resolved = resolve(schema, definitions);
    let Some(properties) = resolved.get("properties").and_then(Value::as_object).filter(|p| !p.is_empty()) else {
        return format!("{title}: none.\n\n");
    };
    let required: Vec<&str> = resolved
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = format!("{title}:\n\n| name | type | required | description |\n|---|---|---|---|\n");
    for (name, property) in properties {
        let ignored = property.get("deprecated").and_then(Value::as_bool) == Some(true);
        let description = property.get("description").and_then(Value::as_str).map(one_line).unwrap_or_default();
        out.push_str(&format!(
            "| `{name}` | {kind} | {required} | {description} |\n",
            kind = if ignored { "any, *ignored*".to_string() } else { type_name(property) },
            required = if required.contains(&name.as_str()) { "yes" } else { "" },
        ));
    }
    out.push('\n');
    out
}

fn resolve<'a>(schema: &'a Value, definitions: &'a Map<String, Value>) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str).and_then(|r| r.rsplit('/').next()) {
        Some(name) => definitions.get(name).unwrap_or(schema),
        None => schema,
    }
}

/// A short, readable name of a schema's type: `string`, `Claim`, `Claim | null`, `JobView[]`.
fn type_name(schema: &Value) -> String {
    if let Some(name) = schema.get("$ref").and_then(Value::as_str).and_then(|r| r.rsplit('/').next()) {
        return format!("[{name}](#{})", name.to_lowercase());
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            return options.iter().map(type_name).collect::<Vec<_>>().join(" \\| ");
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(" \\| ");
    }
    if let Some(value) = schema.get("const") {
        return format!("`{value}`");
    }
    match schema.get("type") {
        Some(Value::String(kind)) => single_type(kind, schema),
        Some(Value::Array(kinds)) => {
            kinds.iter().filter_map(Value::as_str).map(|k| single_type(k, schema)).collect::<Vec<_>>().join(" \\| ")
        }
        _ if schema == &Value::Bool(true) || schema.as_object().is_some_and(|m| m.is_empty()) => "any".into(),
        _ => "object".into(),
    }
}

fn single_type(kind: &str, schema: &Value) -> String {
    match kind {
        "array" => match schema.get("items") {
            Some(items) => format!("{}[]", type_name(items)),
            None => "array".into(),
        },
        "object" => match schema.get("additionalProperties") {
            Some(values) if values.is_object() => format!("map of {}", type_name(values)),
            _ => "object".into(),
        },
        "integer" | "number" => "number".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_path_with_its_argument_and_result_schemas() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), CATALOGUE.len());
        let claim = &doc["paths"]["/v1/ops/claimNextJob"]["post"];
        assert_eq!(claim["x-long-poll"], true);
        assert!(claim["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string());
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        assert!(schemas.contains_key("ClaimArgs") && schemas.contains_key("Claim"));
        assert_eq!(schemas["ClaimArgs"]["properties"]["nowMs"]["deprecated"], true);
    }

    #[test]
    fn the_reference_marks_ignored_arguments() {
        let text = reference_markdown();
        assert!(text.contains("### `enqueueMessage`: arguments and result"));
        assert!(text.contains("| `nowMs` | any, *ignored* |"), "{text}");
    }
}
