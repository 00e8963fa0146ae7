//! Size and scalar expressions of the model language: `heads * head_dim`, `hidden / heads`,
//! `past + seq`, `1 / sqrt(head_dim)`, `-inf`. Parsed once, evaluated either as a symbolic
//! dimension (integers and the run-time symbols, exact division) or as a float (parameters only).

use kiln_runtime::ir::{Dim, Sym};
use std::collections::HashMap;

/// A bound model parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamValue {
    /// An integer (booleans bind as 0/1).
    Int(i64),
    /// A real number.
    Float(f64),
}

/// Parameters in scope, by name.
pub type Params = HashMap<String, ParamValue>;

#[derive(Clone, Debug, PartialEq)]
enum Ast {
    Num(f64, bool),
    Name(String),
    Neg(Box<Ast>),
    Bin(char, Box<Ast>, Box<Ast>),
    Call(String, Vec<Ast>),
}

/// The deepest nesting of parentheses, calls and unary minus an expression may have, and the
/// most operators it may hold: the parser and the evaluators recurse over the tree, and a
/// hostile file (20k nested parentheses, a sum of 50k terms) must be an error, not a stack
/// overflow.
pub const MAX_DEPTH: usize = 64;
/// See `MAX_DEPTH`.
pub const MAX_OPERATORS: usize = 1024;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
    operators: usize,
}

impl<'a> Parser<'a> {
    fn peek(&mut self) -> Option<char> {
        self.src[self.pos..].chars().find(|c| !c.is_whitespace())
    }
    fn bump(&mut self) -> Option<char> {
        let rest = &self.src[self.pos..];
        let skip = rest.len() - rest.trim_start().len();
        self.pos += skip;
        let c = self.src[self.pos..].chars().next()?;
        self.pos += c.len_utf8();
        Some(c)
    }
    /// Counts an operator (binary, unary or call) against `MAX_OPERATORS`.
    fn operator(&mut self) -> Result<(), String> {
        self.operators += 1;
        if self.operators > MAX_OPERATORS {
            return Err(format!("more than {MAX_OPERATORS} operators"));
        }
        Ok(())
    }
    /// Enters a nested sub-expression, bounded by `MAX_DEPTH`.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} deep"));
        }
        let r = f(self);
        self.depth -= 1;
        r
    }
    fn expr(&mut self) -> Result<Ast, String> {
        let mut lhs = self.term()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.bump();
            self.operator()?;
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(self.term()?));
        }
        Ok(lhs)
    }
    fn term(&mut self) -> Result<Ast, String> {
        let mut lhs = self.unary()?;
        while let Some(op @ ('*' | '/' | '%')) = self.peek() {
            self.bump();
            self.operator()?;
            lhs = Ast::Bin(op, Box::new(lhs), Box::new(self.unary()?));
        }
        Ok(lhs)
    }
    fn unary(&mut self) -> Result<Ast, String> {
        if self.peek() == Some('-') {
            self.bump();
            self.operator()?;
            return self.nested(|p| Ok(Ast::Neg(Box::new(p.unary()?))));
        }
        self.atom()
    }
    fn atom(&mut self) -> Result<Ast, String> {
        match self.peek() {
            Some('(') => {
                self.bump();
                let e = self.nested(Self::expr)?;
                match self.bump() {
                    Some(')') => Ok(e),
                    _ => Err("expected `)`".into()),
                }
            }
            Some(c) if c.is_ascii_digit() || c == '.' => {
                self.bump();
                let start = self.pos - 1;
                let bytes = self.src.as_bytes();
                while self.pos < bytes.len() {
                    let b = bytes[self.pos];
                    let exp_sign =
                        (b == b'-' || b == b'+') && matches!(bytes[self.pos - 1], b'e' | b'E');
                    if b.is_ascii_digit() || b == b'.' || b == b'e' || b == b'E' || exp_sign {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let text = &self.src[start..self.pos];
                let v: f64 = text.parse().map_err(|_| format!("bad number `{text}`"))?;
                Ok(Ast::Num(v, !text.contains(['.', 'e', 'E'])))
            }
            Some(c) if c.is_alphabetic() || c == '_' => {
                self.bump();
                let start = self.pos - c.len_utf8();
                while let Some(c) = self.src[self.pos..].chars().next() {
                    if c.is_alphanumeric() || c == '_' {
                        self.pos += c.len_utf8();
                    } else {
                        break;
                    }
                }
                let name = self.src[start..self.pos].to_string();
                if self.peek() == Some('(') {
                    self.bump();
                    self.operator()?;
                    let mut args = vec![self.nested(Self::expr)?];
                    while self.peek() == Some(',') {
                        self.bump();
                        args.push(self.nested(Self::expr)?);
                    }
                    if self.bump() != Some(')') {
                        return Err(format!("expected `)` after arguments of `{name}`"));
                    }
                    return Ok(Ast::Call(name, args));
                }
                Ok(Ast::Name(name))
            }
            Some(c) => Err(format!("unexpected `{c}`")),
            None => Err("unexpected end of expression".into()),
        }
    }
}

/// A parsed expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    text: String,
    ast: Ast,
}

fn sym_of(name: &str) -> Option<Sym> {
    match name {
        "batch" => Some(Sym::Batch),
        "seq" => Some(Sym::Seq),
        "past" => Some(Sym::Past),
        _ => None,
    }
}

impl Expr {
    /// Parses an expression; the error says what was unexpected.
    pub fn parse(text: &str) -> Result<Expr, String> {
        let mut p = Parser {
            src: text,
            pos: 0,
            depth: 0,
            operators: 0,
        };
        let ast = p
            .expr()
            .map_err(|e| format!("in expression `{text}`: {e}"))?;
        if p.peek().is_some() {
            return Err(format!(
                "in expression `{text}`: unexpected `{}`",
                &text[p.pos..].trim()
            ));
        }
        Ok(Expr {
            text: text.to_string(),
            ast,
        })
    }

    /// The source text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluates as a dimension: integer parameters, integer literals and the symbols
    /// `batch`, `seq`, `past`; `+ - *` and exact `/`.
    pub fn eval_dim(&self, params: &Params) -> Result<Dim, String> {
        eval_dim(&self.ast, params).map_err(|e| format!("in `{}`: {e}", self.text))
    }

    /// Evaluates as a real number: parameters, literals, `inf`, `sqrt`, `exp`, `ln`, `pow`.
    pub fn eval_f64(&self, params: &Params) -> Result<f64, String> {
        eval_f64(&self.ast, params).map_err(|e| format!("in `{}`: {e}", self.text))
    }
}

fn eval_dim(ast: &Ast, params: &Params) -> Result<Dim, String> {
    match ast {
        Ast::Num(v, true) if v.abs() < 9.2e18 => Ok(Dim::c(*v as i64)),
        Ast::Num(v, true) => Err(format!("{v:e} does not fit a 64-bit size")),
        Ast::Num(v, false) => Err(format!("{v:?} is not an integer size")),
        Ast::Name(n) => match (sym_of(n), params.get(n)) {
            (Some(s), _) => Ok(Dim::sym(s)),
            (None, Some(ParamValue::Int(i))) => Ok(Dim::c(*i)),
            (None, Some(ParamValue::Float(f))) => {
                Err(format!("`{n}` = {f:?} is not an integer size"))
            }
            (None, None) => Err(format!("unknown name `{n}`")),
        },
        Ast::Neg(a) => {
            let a = eval_dim(a, params)?;
            check_range('*', &a, &Dim::c(-1))?;
            Ok(a.scale(-1))
        }
        Ast::Bin(op, a, b) => {
            let (a, b) = (eval_dim(a, params)?, eval_dim(b, params)?);
            check_range(*op, &a, &b)?;
            match op {
                '+' => Ok(a.add(&b)),
                '-' => Ok(a.sub(&b)),
                '*' => a
                    .mul(&b)
                    .ok_or_else(|| format!("{a} * {b} is not affine in the symbols")),
                '%' => match (a.as_const(), b.as_const()) {
                    (_, Some(0)) => Err(format!("remainder by zero ({a} % 0)")),
                    (Some(x), Some(k)) => Ok(Dim::c(x.rem_euclid(k))),
                    _ => Err(format!("{a} % {b}: `%` needs constant sides")),
                },
                _ => match b.as_const() {
                    Some(0) => Err(format!("division by zero ({a} / 0)")),
                    Some(k) => a
                        .div(k)
                        .ok_or_else(|| format!("{a} is not divisible by {k}")),
                    None => Err(format!("cannot divide by the symbolic size {b}")),
                },
            }
        }
        Ast::Call(f, _) => Err(format!("function `{f}` is not allowed in a size")),
    }
}

/// Checks that `a op b` stays within `i64` (the representation of sizes): an absurd config value
/// is an error, not an arithmetic overflow.
fn check_range(op: char, a: &Dim, b: &Dim) -> Result<(), String> {
    let fits = |v: i128| i64::try_from(v).is_ok();
    let coef = |d: &Dim, s: Sym| d.terms.iter().find(|t| t.0 == s).map_or(0, |t| t.1) as i128;
    let syms = [Sym::Batch, Sym::Seq, Sym::Past];
    let ok = match op {
        '+' | '-' => {
            let sign = if op == '+' { 1 } else { -1 };
            fits(a.constant as i128 + sign * b.constant as i128)
                && syms.iter().all(|&s| fits(coef(a, s) + sign * coef(b, s)))
        }
        '*' => {
            let scaled = |d: &Dim, k: i64| {
                fits(d.constant as i128 * k as i128)
                    && d.terms.iter().all(|t| fits(t.1 as i128 * k as i128))
            };
            match (a.as_const(), b.as_const()) {
                (Some(k), _) => scaled(b, k),
                (_, Some(k)) => scaled(a, k),
                _ => true,
            }
        }
        _ => b.as_const() != Some(-1) || check_range('*', a, b).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{a} {op} {b} overflows a 64-bit size"))
    }
}

fn eval_f64(ast: &Ast, params: &Params) -> Result<f64, String> {
    match ast {
        Ast::Num(v, _) => Ok(*v),
        Ast::Name(n) if n == "inf" => Ok(f64::INFINITY),
        Ast::Name(n) => match params.get(n) {
            Some(ParamValue::Int(i)) => Ok(*i as f64),
            Some(ParamValue::Float(f)) => Ok(*f),
            None if sym_of(n).is_some() => {
                Err(format!("run-time size `{n}` is not allowed in a constant"))
            }
            None => Err(format!("unknown name `{n}`")),
        },
        Ast::Neg(a) => Ok(-eval_f64(a, params)?),
        Ast::Bin(op, a, b) => {
            let (a, b) = (eval_f64(a, params)?, eval_f64(b, params)?);
            Ok(match op {
                '+' => a + b,
                '-' => a - b,
                '*' => a * b,
                _ if b == 0.0 => return Err(format!("division by zero ({a} {op} 0)")),
                '%' => a.rem_euclid(b),
                _ => a / b,
            })
        }
        Ast::Call(f, args) => {
            let v: Vec<f64> = args
                .iter()
                .map(|a| eval_f64(a, params))
                .collect::<Result<_, _>>()?;
            match (f.as_str(), v.as_slice()) {
                ("sqrt", [x]) => Ok(x.sqrt()),
                ("exp", [x]) => Ok(x.exp()),
                ("ln", [x]) => Ok(x.ln()),
                ("pow", [x, y]) => Ok(x.powf(*y)),
                _ => Err(format!(
                    "unknown function `{f}` with {} argument(s)",
                    v.len()
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        [
            ("heads", ParamValue::Int(9)),
            ("hidden", ParamValue::Int(576)),
            ("eps", ParamValue::Float(1e-5)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn sizes_are_exact_and_symbolic() {
        let p = params();
        assert_eq!(
            Expr::parse("hidden / heads").unwrap().eval_dim(&p).unwrap(),
            Dim::c(64)
        );
        assert_eq!(
            Expr::parse("past + seq")
                .unwrap()
                .eval_dim(&p)
                .unwrap()
                .to_string(),
            "seq+past"
        );
        assert_eq!(
            Expr::parse("seq - 1")
                .unwrap()
                .eval_dim(&p)
                .unwrap()
                .to_string(),
            "seq-1"
        );
        assert!(Expr::parse("hidden / 5")
            .unwrap()
            .eval_dim(&p)
            .unwrap_err()
            .contains("divisible"));
        assert!(Expr::parse("eps").unwrap().eval_dim(&p).is_err());
        assert!(Expr::parse("seq * seq").unwrap().eval_dim(&p).is_err());
        assert!(Expr::parse("hidden * 4611686018427387904")
            .unwrap()
            .eval_dim(&p)
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn scalars() {
        let p = params();
        let v = Expr::parse("1 / sqrt(hidden / heads)")
            .unwrap()
            .eval_f64(&p)
            .unwrap();
        assert!((v - 0.125).abs() < 1e-12);
        assert_eq!(
            Expr::parse("-inf").unwrap().eval_f64(&p).unwrap(),
            f64::NEG_INFINITY
        );
        assert_eq!(Expr::parse("2.5e-1").unwrap().eval_f64(&p).unwrap(), 0.25);
        assert!(Expr::parse("1 +").is_err());
        assert!(Expr::parse("(1").is_err());
        assert!(Expr::parse("foo(1)").unwrap().eval_f64(&p).is_err());
    }

    #[test]
    fn remainders_and_limits() {
        let p = params();
        let dim = |t: &str| Expr::parse(t).unwrap().eval_dim(&p);
        assert_eq!(dim("heads % 2").unwrap(), Dim::c(1));
        assert_eq!(dim("-7 % 3").unwrap(), Dim::c(2));
        assert!(dim("seq % 2").unwrap_err().contains("constant sides"));
        assert!(dim("heads % 0").unwrap_err().contains("by zero"));
        assert!(dim("hidden / 0").unwrap_err().contains("division by zero"));
        let f = |t: &str| Expr::parse(t).unwrap().eval_f64(&p);
        assert_eq!(f("7.5 % 2").unwrap(), 1.5);
        assert!(f("1 / 0").unwrap_err().contains("division by zero"));
        assert!(dim("99999999999999999999")
            .unwrap_err()
            .contains("does not fit"));
        let deep = format!("{}1{}", "(".repeat(65), ")".repeat(65));
        assert!(Expr::parse(&deep)
            .unwrap_err()
            .contains("nested more than 64"));
        let ok = format!("{}1{}", "(".repeat(64), ")".repeat(64));
        assert!(Expr::parse(&ok).is_ok());
        let sum = vec!["1"; 1026].join("+");
        assert!(Expr::parse(&sum)
            .unwrap_err()
            .contains("more than 1024 operators"));
    }
}
