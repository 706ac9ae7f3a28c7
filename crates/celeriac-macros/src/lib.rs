//! `#[celeriac::task]`: turn a Rust function into a celeriac task.
//!
//! ```ignore
//! #[celeriac::task(name = "images.resize", queue = "images", max_retries = 5,
//!                  retry_backoff = 1.0, autoretry_for = ["IoError"], time_limit = 30,
//!                  rate_limit = "10/s")]
//! async fn resize(path: String, width: u32) -> Result<String, std::io::Error> { ... }
//! ```
//!
//! The function becomes a unit struct of the same name that implements `celeriac::Task`, with:
//! - `resize::run(..)`: the original function, to call directly;
//! - `resize::s(..) -> Signature`: a call with options still to set (`.countdown(..)`, ...);
//! - `resize::delay(&client, ..)`: send it now.
//!
//! Arguments are decoded from the message by position, then by parameter name, with Python's
//! `TypeError` messages on mistakes. A first parameter of type `&TaskContext` receives the task's
//! context (id, retries, soft time limit). A function that is not `async` runs on tokio's
//! blocking pool. The return type may be `Result<T, E>` with `E: Into<TaskError>` (any
//! `std::error::Error` is), or any serializable `T`.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::{parse_macro_input, spanned::Spanned, FnArg, ItemFn, Lit, Pat, ReturnType, Type};

#[derive(Default)]
struct Attrs {
    name: Option<String>,
    queue: Option<String>,
    max_retries: Option<Option<u32>>,
    retry_backoff: Option<f64>,
    retry_backoff_max: Option<f64>,
    retry_jitter: Option<bool>,
    default_retry_delay: Option<f64>,
    autoretry_for: Vec<String>,
    time_limit: Option<f64>,
    soft_time_limit: Option<f64>,
    ignore_result: Option<bool>,
    store_errors_even_if_ignored: Option<bool>,
    rate_limit: Option<String>,
}

fn lit_f64(lit: &Lit) -> syn::Result<f64> {
    match lit {
        Lit::Int(i) => i.base10_parse::<f64>(),
        Lit::Float(f) => f.base10_parse::<f64>(),
        Lit::Bool(b) => Ok(if b.value { 1.0 } else { 0.0 }),
        other => Err(syn::Error::new(other.span(), "expected a number of seconds")),
    }
}

fn parse_attrs(args: TokenStream) -> syn::Result<Attrs> {
    let mut a = Attrs::default();
    let parser = syn::meta::parser(|meta| {
        let key = meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default();
        match key.as_str() {
            "name" => a.name = Some(meta.value()?.parse::<syn::LitStr>()?.value()),
            "queue" => a.queue = Some(meta.value()?.parse::<syn::LitStr>()?.value()),
            "rate_limit" => a.rate_limit = Some(meta.value()?.parse::<syn::LitStr>()?.value()),
            "max_retries" => {
                let e: syn::Expr = meta.value()?.parse()?;
                a.max_retries = Some(match e {
                    syn::Expr::Lit(syn::ExprLit { lit: Lit::Int(i), .. }) => Some(i.base10_parse()?),
                    syn::Expr::Path(p) if p.path.is_ident("None") => None,
                    other => return Err(syn::Error::new(other.span(), "max_retries takes an integer or None")),
                });
            }
            "retry_backoff" => a.retry_backoff = Some(lit_f64(&meta.value()?.parse()?)?),
            "retry_backoff_max" => a.retry_backoff_max = Some(lit_f64(&meta.value()?.parse()?)?),
            "default_retry_delay" => a.default_retry_delay = Some(lit_f64(&meta.value()?.parse()?)?),
            "time_limit" => a.time_limit = Some(lit_f64(&meta.value()?.parse()?)?),
            "soft_time_limit" => a.soft_time_limit = Some(lit_f64(&meta.value()?.parse()?)?),
            "retry_jitter" => a.retry_jitter = Some(meta.value()?.parse::<syn::LitBool>()?.value),
            "ignore_result" => a.ignore_result = Some(meta.value()?.parse::<syn::LitBool>()?.value),
            "store_errors_even_if_ignored" => {
                a.store_errors_even_if_ignored = Some(meta.value()?.parse::<syn::LitBool>()?.value)
            }
            "autoretry_for" => {
                let arr: syn::ExprArray = meta.value()?.parse()?;
                for e in arr.elems {
                    match e {
                        syn::Expr::Lit(syn::ExprLit { lit: Lit::Str(s), .. }) => a.autoretry_for.push(s.value()),
                        syn::Expr::Path(p) => {
                            let last = p.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default();
                            a.autoretry_for.push(last);
                        }
                        other => return Err(syn::Error::new(other.span(), "autoretry_for takes error type names")),
                    }
                }
            }
            _ => {
                return Err(meta.error(
                    "unknown task option (known: name, queue, max_retries, retry_backoff, retry_backoff_max, \
                     retry_jitter, default_retry_delay, autoretry_for, time_limit, soft_time_limit, ignore_result, \
                     store_errors_even_if_ignored, rate_limit)",
                ))
            }
        }
        Ok(())
    });
    syn::parse::Parser::parse(parser, args)?;
    Ok(a)
}

fn is_context(ty: &Type) -> bool {
    let ty = match ty {
        Type::Reference(r) => &*r.elem,
        other => other,
    };
    matches!(ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "TaskContext"))
}

fn returns_result(ret: &ReturnType) -> bool {
    match ret {
        ReturnType::Type(_, ty) => {
            matches!(&**ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Result"))
        }
        ReturnType::Default => false,
    }
}

/// Make a task of a function. See the crate documentation for the options.
#[proc_macro_attribute]
pub fn task(args: TokenStream, input: TokenStream) -> TokenStream {
    let attrs = match parse_attrs(args) {
        Ok(a) => a,
        Err(e) => return e.to_compile_error().into(),
    };
    let func = parse_macro_input!(input as ItemFn);
    match expand(attrs, func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(attrs: Attrs, func: ItemFn) -> syn::Result<TokenStream2> {
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let is_async = func.sig.asyncness.is_some();
    if !func.sig.generics.params.is_empty() {
        return Err(syn::Error::new(func.sig.generics.span(), "a task function cannot be generic"));
    }
    let mut takes_ctx = false;
    let mut names = Vec::new();
    let mut types = Vec::new();
    for (i, arg) in func.sig.inputs.iter().enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(arg.span(), "a task function cannot take self"));
        };
        if i == 0 && is_context(&pt.ty) {
            takes_ctx = true;
            continue;
        }
        let Pat::Ident(pi) = &*pt.pat else {
            return Err(syn::Error::new(pt.pat.span(), "task parameters must be plain names"));
        };
        if matches!(&*pt.ty, Type::Reference(_)) {
            return Err(syn::Error::new(pt.ty.span(), "task parameters must be owned types (String, not &str)"));
        }
        names.push(pi.ident.clone());
        types.push((*pt.ty).clone());
    }
    let name_strs: Vec<String> = names.iter().map(|n| n.to_string().trim_start_matches("r#").to_string()).collect();
    let idx: Vec<usize> = (0..names.len()).collect();
    let vars: Vec<_> = names.iter().enumerate().map(|(i, _)| format_ident!("__a{}", i)).collect();

    let name_expr = match &attrs.name {
        Some(n) => quote! { #n },
        None => {
            let fname = ident.to_string();
            quote! {{
                static NAME: ::std::sync::OnceLock<::std::string::String> = ::std::sync::OnceLock::new();
                NAME.get_or_init(|| format!("{}.{}", module_path!().replace("::", "."), #fname)).as_str()
            }}
        }
    };
    let opt_f = |v: Option<f64>| match v {
        Some(x) => quote! { ::core::option::Option::Some(#x) },
        None => quote! { ::core::option::Option::None },
    };
    let queue = match &attrs.queue {
        Some(q) => quote! { ::core::option::Option::Some(::std::string::String::from(#q)) },
        None => quote! { ::core::option::Option::None },
    };
    let max_retries = match attrs.max_retries {
        Some(Some(n)) => quote! { ::core::option::Option::Some(#n) },
        Some(None) => quote! { ::core::option::Option::None },
        None => quote! { __defaults.max_retries },
    };
    let backoff_factor = opt_f(attrs.retry_backoff.filter(|f| *f > 0.0));
    let backoff_max = attrs.retry_backoff_max.map(|m| quote! { #m }).unwrap_or(quote! { __defaults.backoff.max });
    let jitter = attrs.retry_jitter.map(|j| quote! { #j }).unwrap_or(quote! { __defaults.backoff.jitter });
    let default_delay =
        attrs.default_retry_delay.map(|d| quote! { #d }).unwrap_or(quote! { __defaults.backoff.default_delay });
    let autoretry = &attrs.autoretry_for;
    let time_limit = opt_f(attrs.time_limit);
    let soft_time_limit = opt_f(attrs.soft_time_limit);
    let ignore_result = attrs.ignore_result.unwrap_or(false);
    let store_errors_even_if_ignored = attrs.store_errors_even_if_ignored.unwrap_or(false);
    let rate_limit = match &attrs.rate_limit {
        Some(r) => quote! { ::core::option::Option::Some(::std::string::String::from(#r)) },
        None => quote! { ::core::option::Option::None },
    };

    // The original function, kept as `Type::run`.
    let mut run_fn = func.clone();
    run_fn.sig.ident = format_ident!("run");
    run_fn.vis = vis.clone();
    let run_attrs = &func.attrs;

    let ctx_arg = if takes_ctx {
        quote! { &__ctx, }
    } else {
        quote! {}
    };
    let call = if is_async {
        quote! { Self::run(#ctx_arg #(#vars),*).await }
    } else {
        quote! {
            // The panic is caught on the blocking thread, where its location was recorded.
            ::celeriac::__private::tokio::task::spawn_blocking(move || {
                // A prefork child reports this thread as the task's (for `inspect active`).
                ::celeriac::__private::task_thread::entered();
                ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| Self::run(#ctx_arg #(#vars),*)))
                    .map_err(|p| ::celeriac::__private::panics::to_task_error(p.as_ref()))
            })
            .await
            .map_err(|e| ::celeriac::TaskError::new("Panic", e.to_string()).with_module("celeriac"))??
        }
    };
    let convert = if returns_result(&func.sig.output) {
        quote! {
            match __out {
                ::core::result::Result::Ok(v) => ::celeriac::__private::to_result_value(v),
                ::core::result::Result::Err(e) => ::core::result::Result::Err(::core::convert::Into::<::celeriac::TaskError>::into(e)),
            }
        }
    } else {
        quote! { ::celeriac::__private::to_result_value(__out) }
    };
    let doc = format!(
        "The `{ident}` task. Call [`{ident}::s`] or [`{ident}::delay`] to send it, [`{ident}::run`] to run it here."
    );

    Ok(quote! {
        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, Default)]
        #vis struct #ident;

        impl #ident {
            #(#run_attrs)*
            #[allow(clippy::too_many_arguments)]
            #run_fn

            /// A call of this task with these arguments, to send with options.
            #[allow(clippy::too_many_arguments)]
            #vis fn s(#(#names: #types),*) -> ::celeriac::Signature {
                let __task = #ident;
                ::celeriac::Signature::for_task(&__task) #(.arg(#names))*
            }

            /// Send this task now with these arguments.
            #[allow(clippy::too_many_arguments)]
            #vis async fn delay(client: &::celeriac::Client, #(#names: #types),*) -> ::core::result::Result<::celeriac::AsyncResult, ::celeriac::PublishError> {
                Self::s(#(#names),*).apply_async(client).await
            }
        }

        impl ::celeriac::Task for #ident {
            fn name(&self) -> &str {
                #name_expr
            }

            fn options(&self) -> ::celeriac::TaskOptions {
                let __defaults = ::celeriac::TaskOptions::default();
                ::celeriac::TaskOptions {
                    queue: #queue,
                    max_retries: #max_retries,
                    backoff: ::celeriac::Backoff {
                        factor: #backoff_factor,
                        max: #backoff_max,
                        jitter: #jitter,
                        default_delay: #default_delay,
                    },
                    autoretry_for: ::std::vec![#(::std::string::String::from(#autoretry)),*],
                    time_limit: #time_limit,
                    soft_time_limit: #soft_time_limit,
                    ignore_result: #ignore_result,
                    store_errors_even_if_ignored: #store_errors_even_if_ignored,
                    rate_limit: #rate_limit,
                    blocking: !#is_async,
                }
            }

            fn call(
                &self,
                __ctx: ::celeriac::TaskContext,
                __args: ::std::vec::Vec<::celeriac::__private::Value>,
                __kwargs: ::celeriac::__private::Map<::std::string::String, ::celeriac::__private::Value>,
            ) -> ::celeriac::__private::TaskFuture {
                let __decoded = (|| {
                    let mut __d = ::celeriac::__private::ArgDecoder::new(::celeriac::Task::name(self), __args, __kwargs);
                    #( let #vars: #types = __d.take(#idx, #name_strs)?; )*
                    __d.finish()?;
                    ::core::result::Result::<_, ::celeriac::TaskError>::Ok((#(#vars,)*))
                })();
                ::std::boxed::Box::pin(async move {
                    let (#(#vars,)*) = __decoded?;
                    let _ = &__ctx;
                    let __out = #call;
                    #convert
                })
            }
        }
    })
}
