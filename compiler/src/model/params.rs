//! Binds a model file's parameters from a checkpoint's `config.json`.

use super::ast::Param;
use super::expr::{Expr, ParamValue, Params};
use super::ModelError;
use serde_json::Value;

fn lookup<'a>(config: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(config, |v, key| v.get(key))
        .filter(|v| !v.is_null())
}

/// The value of a config key as model files name keys: `a|b.c` tries `a`, then the nested key
/// `b.c`; `null` counts as absent. Returns the key that matched and its value.
pub fn config_value<'a, 'k>(config: &'a Value, keys: &'k str) -> Option<(&'k str, &'a Value)> {
    keys.split('|')
        .find_map(|k| lookup(config, k).map(|v| (k, v)))
}

fn from_json(name: &str, key: &str, v: &Value) -> Result<ParamValue, ModelError> {
    let bad = || ModelError::Param {
        name: name.into(),
        message: format!("config key `{key}` is {v}, not a number or boolean"),
    };
    match v {
        Value::Bool(b) => Ok(ParamValue::Int(*b as i64)),
        Value::Number(n) => Ok(match n.as_i64() {
            Some(i) => ParamValue::Int(i),
            None => ParamValue::Float(n.as_f64().ok_or_else(bad)?),
        }),
        _ => Err(bad()),
    }
}

fn eval(name: &str, text: &str, params: &Params) -> Result<ParamValue, ModelError> {
    let err = |message: String| {
        let values = named(text, params);
        ModelError::Param {
            name: name.into(),
            message: if values.is_empty() {
                message
            } else {
                format!("{message}, where {values}")
            },
        }
    };
    let e = Expr::parse(text).map_err(err)?;
    match e.eval_dim(params) {
        Ok(d) if d.as_const().is_some() => Ok(ParamValue::Int(d.constant)),
        _ => match e.eval_f64(params).map_err(err)? {
            v if v.is_nan() => Err(err(format!("`{text}` is not a number"))),
            v => Ok(ParamValue::Float(v)),
        },
    }
}

/// `name = value` for each parameter an expression mentions, for error messages.
fn named(text: &str, params: &Params) -> String {
    let mut shown: Vec<String> = params
        .iter()
        .filter(|(n, _)| {
            text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == n.as_str())
        })
        .map(|(n, v)| match v {
            ParamValue::Int(i) => format!("{n} = {i}"),
            ParamValue::Float(f) => format!("{n} = {f}"),
        })
        .collect();
    shown.sort();
    shown.join(", ")
}

/// Binds every parameter in order. Missing required keys name the key.
pub fn bind(decls: &[(String, Param)], config: &Value) -> Result<Params, ModelError> {
    let mut params = Params::new();
    for (name, decl) in decls {
        let found = |keys: &str| config_value(config, keys).map(|(k, v)| (k.to_string(), v));
        let value = match decl {
            Param::Config(keys) => match found(keys) {
                Some((k, v)) => from_json(name, &k, v)?,
                None => {
                    return Err(ModelError::Param {
                        name: name.clone(),
                        message: format!("config.json has no `{keys}`"),
                    })
                }
            },
            Param::ConfigOr(keys, default) => match found(keys) {
                Some((k, v)) => from_json(name, &k, v)?,
                None => eval(name, default, &params)?,
            },
            Param::Expr(text) => eval(name, text, &params)?,
        };
        params.insert(name.clone(), value);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_config_defaults_and_expressions() {
        let decls = vec![
            ("hidden".to_string(), Param::Config("hidden_size".into())),
            (
                "heads".to_string(),
                Param::Config("num_attention_heads".into()),
            ),
            (
                "kv".to_string(),
                Param::ConfigOr("num_key_value_heads".into(), "heads".into()),
            ),
            (
                "theta".to_string(),
                Param::ConfigOr(
                    "rope_theta|rope_parameters.rope_theta".into(),
                    "10000".into(),
                ),
            ),
            ("hd".to_string(), Param::Expr("hidden / heads".into())),
            (
                "tied".to_string(),
                Param::ConfigOr("tie_word_embeddings".into(), "0".into()),
            ),
        ];
        let cfg: Value = serde_json::json!({"hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {"rope_theta": 100000.0}, "tie_word_embeddings": true});
        let p = bind(&decls, &cfg).unwrap();
        assert_eq!(p["kv"], ParamValue::Int(4));
        assert_eq!(p["hd"], ParamValue::Int(16));
        assert_eq!(p["theta"], ParamValue::Float(100000.0));
        assert_eq!(p["tied"], ParamValue::Int(1));
        let err = bind(&decls, &serde_json::json!({"hidden_size": 64})).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"));
    }
}
