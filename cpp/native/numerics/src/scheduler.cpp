// The runtime's numpy schedulers (runtime/schedulers/*.py) in C++. Each formula keeps the Python source's
// order of operations (numpy evaluates elementwise expressions left to right, scalars first where the
// Python groups them), so results agree to the last bits in most steps and within float64 libm
// differences otherwise. See docs/sampler_spec.md for the maths and the papers.
#include "ldm_rt/native/scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <tuple>

#include "ldm_rt/native/pyrepr.hpp"

namespace ldm_rt::native {

using Vec = std::vector<double>;

// ---- config ---------------------------------------------------------------------------------------------

namespace {

const std::vector<std::string> kBetaSchedules = {"linear", "scaled_linear", "squaredcos_cap_v2"};
const std::vector<std::string> kPredictionTypes = {"epsilon", "v_prediction", "sample"};
const std::vector<std::string> kSpacings = {"leading", "trailing", "linspace"};
const std::vector<std::string> kVarianceTypes = {"fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"};
const std::vector<std::string> kFinalSigmas = {"zero", "sigma_min"};
const std::vector<std::string> kSolverTypes = {"midpoint", "heun", "logrho", "bh1", "bh2"};
const std::vector<std::string> kAlgorithms = {"dpmsolver++", "sde-dpmsolver++"};

SchedulerConfigError config_error(const std::string& m) { return SchedulerConfigError(m); }

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

void check_choice(const char* name, const std::string& value, const std::vector<std::string>& choices,
                  bool none_allowed = false) {
  if (contains(choices, value)) return;
  std::string list = "[";
  if (none_allowed) list += "None, ";
  for (std::size_t i = 0; i < choices.size(); ++i) list += (i ? ", " : "") + py_str_repr(choices[i]);
  list += "]";
  throw config_error(std::string("scheduler config ") + name + "=" + py_str_repr(value) +
                     " is not supported; use one of " + list);
}

// diffusers options we do not implement, with the value that makes them a no-op (config.py UNSUPPORTED_OPTIONS).
struct Unsupported {
  const char* key;
  const char* noop_json;  // the no-op value as JSON
  const char* noop_repr;  // as Python prints it
};
const Unsupported kUnsupported[] = {
    {"use_exponential_sigmas", "false", "False"}, {"use_beta_sigmas", "false", "False"},
    {"use_lu_lambdas", "false", "False"},         {"use_flow_sigmas", "false", "False"},
    {"use_dynamic_shifting", "false", "False"},   {"timestep_type", "\"discrete\"", "'discrete'"},
    {"predict_x0", "true", "True"},               {"solver_p", "null", "None"},
};

// JSON value equality as Python's == on the loaded values (1 == 1.0 == True is not a concern here: the
// no-op values are booleans, a string and null).
bool json_equals_noop(const Json& v, const char* noop_json) {
  Json noop = parse_json(noop_json);
  if (v.type() != noop.type()) return false;
  if (v.is_bool()) return v.as_bool() == noop.as_bool();
  if (v.is_string()) return v.as_string() == noop.as_string();
  return v.is_null();
}

const char* py_type_name(const Json& v) {
  switch (v.type()) {
    case Json::Type::Null: return "NoneType";
    case Json::Type::Bool: return "bool";
    case Json::Type::Number: return v.is_integer() ? "int" : "float";
    case Json::Type::String: return "str";
    case Json::Type::Array: return "list";
    case Json::Type::Object: return "dict";
  }
  return "object";
}

[[noreturn]] void wrong_type(const std::string& field, const Json& v, const std::string& default_repr) {
  throw config_error("scheduler config field " + field + " has the wrong type: " + py_json_repr(v) + " (" +
                     py_type_name(v) + "); expected a value like " + default_repr);
}

}  // namespace

namespace {
void validate_config(const SchedulerConfig& c, const std::map<std::string, std::string>& reprs);
}

SchedulerConfig SchedulerConfig::from_json(const Json& data) {
  if (!data.is_object())
    throw config_error(std::string("a scheduler config must be a JSON object, got ") + py_type_name(data));
  SchedulerConfig c;
  const SchedulerConfig d;  // defaults, for messages
  // Python builds the dataclass first and checks types in field order afterwards; collect, then check.
  std::map<std::string, Json> fields;
  static const std::set<std::string> names = {
      "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
      "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range", "thresholding",
      "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr", "variance_type", "skip_prk_steps",
      "interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max", "final_sigmas_type", "solver_order",
      "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "disable_corrector",
      "lambda_min_clipped", "original_inference_steps", "timestep_scaling"};
  for (const auto& [key, value] : data.as_object()) {
    if (!key.empty() && key[0] == '_') continue;
    bool handled = false;
    for (const auto& u : kUnsupported) {
      if (key == u.key) {
        handled = true;
        if (!value.is_null() && !json_equals_noop(value, u.noop_json)) {
          std::string hint = key.size() >= 7 && key.compare(key.size() - 7, 7, "_sigmas") == 0
                                 ? " (Karras sigmas: use_karras_sigmas=true)"
                                 : "";
          throw config_error("scheduler option " + key + "=" + py_json_repr(value) + " is not supported; set it to " +
                             u.noop_repr + hint);
        }
      }
    }
    if (handled || !names.count(key)) continue;  // unknown keys are ignored, as the runtime does
    fields[key] = value;                         // a repeated key keeps the last value (as Python's dict)
  }
  auto get = [&](const char* name) -> const Json* {
    auto it = fields.find(name);
    return it == fields.end() ? nullptr : &it->second;
  };
  // Type checks in the dataclass's field order (config.py _check_types).
  auto as_int = [&](const char* name, int64_t& out, int64_t def) {
    if (const Json* v = get(name)) {
      if (!v->is_number() || !v->is_integer()) wrong_type(name, *v, std::to_string(def));
      try {
        out = v->as_int();
      } catch (const JsonError&) {
        throw config_error(std::string("scheduler config field ") + name + " is out of range: " + v->number_text());
      }
    }
  };
  auto as_float = [&](const char* name, double& out, double def) {
    if (const Json* v = get(name)) {
      if (!v->is_number()) wrong_type(name, *v, py_float_repr(def));
      out = v->as_double();
    }
  };
  auto as_opt_float = [&](const char* name, std::optional<double>& out) {
    if (const Json* v = get(name)) {
      if (v->is_null()) out.reset();
      else if (!v->is_number()) wrong_type(name, *v, "None");
      else out = v->as_double();
    }
  };
  auto as_bool = [&](const char* name, bool& out, bool def) {
    if (const Json* v = get(name)) {
      if (!v->is_bool()) wrong_type(name, *v, def ? "True" : "False");
      out = v->as_bool();
    }
  };
  auto as_str = [&](const char* name, std::string& out, const std::string& def) {
    if (const Json* v = get(name)) {
      if (!v->is_string()) wrong_type(name, *v, py_str_repr(def));
      out = v->as_string();
    }
  };
  as_int("num_train_timesteps", c.num_train_timesteps, d.num_train_timesteps);
  as_float("beta_start", c.beta_start, d.beta_start);
  as_float("beta_end", c.beta_end, d.beta_end);
  as_str("beta_schedule", c.beta_schedule, d.beta_schedule);
  if (const Json* v = get("trained_betas")) {
    if (v->is_null()) {
      c.trained_betas.reset();
    } else {
      if (!v->is_array()) wrong_type("trained_betas", *v, "None");
      std::vector<double> betas;
      for (const Json& b : v->as_array()) {
        if (!b.is_number()) wrong_type("trained_betas", *v, "None");
        betas.push_back(b.as_double());
      }
      c.trained_betas = std::move(betas);
    }
  }
  as_str("prediction_type", c.prediction_type, d.prediction_type);
  as_str("timestep_spacing", c.timestep_spacing, d.timestep_spacing);
  as_int("steps_offset", c.steps_offset, d.steps_offset);
  as_bool("set_alpha_to_one", c.set_alpha_to_one, d.set_alpha_to_one);
  as_bool("clip_sample", c.clip_sample, d.clip_sample);
  as_float("clip_sample_range", c.clip_sample_range, d.clip_sample_range);
  as_bool("thresholding", c.thresholding, d.thresholding);
  as_float("dynamic_thresholding_ratio", c.dynamic_thresholding_ratio, d.dynamic_thresholding_ratio);
  as_float("sample_max_value", c.sample_max_value, d.sample_max_value);
  as_bool("rescale_betas_zero_snr", c.rescale_betas_zero_snr, d.rescale_betas_zero_snr);
  if (const Json* v = get("variance_type")) {
    if (v->is_null()) c.variance_type.reset();
    else if (!v->is_string()) wrong_type("variance_type", *v, "'fixed_small'");
    else c.variance_type = v->as_string();
  }
  as_bool("skip_prk_steps", c.skip_prk_steps, d.skip_prk_steps);
  as_str("interpolation_type", c.interpolation_type, d.interpolation_type);
  as_bool("use_karras_sigmas", c.use_karras_sigmas, d.use_karras_sigmas);
  as_opt_float("sigma_min", c.sigma_min);
  as_opt_float("sigma_max", c.sigma_max);
  as_str("final_sigmas_type", c.final_sigmas_type, d.final_sigmas_type);
  as_int("solver_order", c.solver_order, d.solver_order);
  as_str("algorithm_type", c.algorithm_type, d.algorithm_type);
  as_str("solver_type", c.solver_type, d.solver_type);
  as_bool("lower_order_final", c.lower_order_final, d.lower_order_final);
  as_bool("euler_at_final", c.euler_at_final, d.euler_at_final);
  if (const Json* v = get("disable_corrector")) {
    if (!v->is_array()) wrong_type("disable_corrector", *v, "()");
    c.disable_corrector.clear();
    for (const Json& i : v->as_array()) {
      if (!i.is_number() || !i.is_integer()) wrong_type("disable_corrector", *v, "()");
      c.disable_corrector.push_back(i.as_int());
    }
  }
  if (const Json* v = get("lambda_min_clipped")) {
    if (v->is_null()) c.lambda_min_clipped = -std::numeric_limits<double>::infinity();
    else if (!v->is_number()) wrong_type("lambda_min_clipped", *v, "-inf");
    else c.lambda_min_clipped = v->as_double();
  }
  as_int("original_inference_steps", c.original_inference_steps, d.original_inference_steps);
  as_float("timestep_scaling", c.timestep_scaling, d.timestep_scaling);
  // Messages print numbers as the file wrote them (Python's str of an int or a float).
  std::map<std::string, std::string> reprs;
  for (const auto& [key, value] : fields)
    if (value.is_number()) reprs[key] = py_json_repr(value);
  validate_config(c, reprs);
  return c;
}

void SchedulerConfig::validate() const { validate_config(*this, {}); }

namespace {
void validate_config(const SchedulerConfig& cfg, const std::map<std::string, std::string>& reprs) {
  const auto& [num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
               timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, clip_sample_range, thresholding,
               dynamic_thresholding_ratio, sample_max_value, rescale_betas_zero_snr, variance_type, skip_prk_steps,
               interpolation_type, use_karras_sigmas, sigma_min, sigma_max, final_sigmas_type, solver_order,
               algorithm_type, solver_type, lower_order_final, euler_at_final, disable_corrector, lambda_min_clipped,
               original_inference_steps, timestep_scaling] = cfg;
  auto repr = [&](const char* name, double v) {
    auto it = reprs.find(name);
    return it != reprs.end() ? it->second : py_float_repr(v);
  };
  for (int64_t i : disable_corrector)
    if (i < 0) {
      std::string list = "[";
      for (std::size_t k = 0; k < disable_corrector.size(); ++k)
        list += (k ? ", " : "") + std::to_string(disable_corrector[k]);
      throw config_error("disable_corrector must list step indices >= 0, got " + list + "]");
    }
  check_choice("beta_schedule", beta_schedule, kBetaSchedules);
  check_choice("prediction_type", prediction_type, kPredictionTypes);
  check_choice("timestep_spacing", timestep_spacing, kSpacings);
  if (variance_type) check_choice("variance_type", *variance_type, kVarianceTypes, true);
  check_choice("final_sigmas_type", final_sigmas_type, kFinalSigmas);
  check_choice("interpolation_type", interpolation_type, {"linear"});
  check_choice("algorithm_type", algorithm_type, kAlgorithms);
  check_choice("solver_type", solver_type, kSolverTypes);
  if (solver_order < 1 || solver_order > 3)
    throw config_error("scheduler config solver_order=" + std::to_string(solver_order) +
                       " is not supported; use one of [1, 2, 3]");
  if (num_train_timesteps < 2)
    throw config_error("num_train_timesteps must be >= 2, got " + std::to_string(num_train_timesteps));
  if (num_train_timesteps > (int64_t{1} << 24))  // bound the tables before allocating them
    throw config_error("num_train_timesteps must be <= 16777216, got " + std::to_string(num_train_timesteps));
  if (trained_betas) {
    if (static_cast<int64_t>(trained_betas->size()) != num_train_timesteps)
      throw config_error("trained_betas has " + std::to_string(trained_betas->size()) +
                         " values but num_train_timesteps is " + std::to_string(num_train_timesteps) +
                         "; give one beta per training timestep");
    for (double b : *trained_betas)
      if (!(0.0 < b && b <= 1.0)) throw config_error("trained_betas must all lie in (0, 1]");
  } else if (!(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0)) {
    throw config_error("need 0 < beta_start <= beta_end < 1, got beta_start=" + repr("beta_start", beta_start) +
                       ", beta_end=" + repr("beta_end", beta_end));
  }
  if (original_inference_steps < 1)
    throw config_error("original_inference_steps must be >= 1, got " + std::to_string(original_inference_steps));
  if (timestep_scaling <= 0) throw config_error("timestep_scaling must be > 0, got " + repr("timestep_scaling", timestep_scaling));
  if (steps_offset < 0) throw config_error("steps_offset must be >= 0, got " + std::to_string(steps_offset));
  if (clip_sample_range <= 0 || sample_max_value <= 0)
    throw config_error("clip_sample_range and sample_max_value must be > 0");
  if (!(0.0 < dynamic_thresholding_ratio && dynamic_thresholding_ratio <= 1.0))
    throw config_error("dynamic_thresholding_ratio must be in (0, 1], got " +
                       repr("dynamic_thresholding_ratio", dynamic_thresholding_ratio));
  if (sigma_min && *sigma_min <= 0) throw config_error("sigma_min must be > 0 or null, got " + repr("sigma_min", *sigma_min));
  if (sigma_max && *sigma_max <= 0) throw config_error("sigma_max must be > 0 or null, got " + repr("sigma_max", *sigma_max));
}
}  // namespace

// ---- tables (config.py, sigmas.py) ----------------------------------------------------------------------

namespace {

// numpy.linspace(start, stop, num) in float64: start + i * step, the last point exactly stop.
Vec linspace(double start, double stop, int64_t num) {
  Vec y(static_cast<std::size_t>(std::max<int64_t>(num, 0)));
  if (num <= 0) return y;
  if (num == 1) {
    y[0] = start;
    return y;
  }
  double div = static_cast<double>(num - 1);
  double delta = stop - start;
  double step = delta / div;
  for (int64_t i = 0; i < num; ++i) {
    if (step == 0) y[i] = static_cast<double>(i) / div * delta + start;
    else y[i] = static_cast<double>(i) * step + start;
  }
  y[num - 1] = stop;
  return y;
}

// numpy.arange(start, stop, step) for floats: ceil((stop - start) / step) values start + i * step.
Vec arange(double start, double stop, double step) {
  double len = std::ceil((stop - start) / step);
  Vec y;
  if (!(len > 0)) return y;
  y.resize(static_cast<std::size_t>(len));
  // numpy fills as start, start + delta, then start + i * delta.
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = start + static_cast<double>(i) * step;
  return y;
}

inline double rint_even(double x) { return std::nearbyint(x); }  // numpy.round: half to even
inline float f32(double x) { return static_cast<float>(x); }

double alpha_bar_cosine(double t) {
  double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
  return c * c;  // Python's ** 2 on a float: pow(c, 2), which is c * c exactly
}

std::vector<float> betas_for(const SchedulerConfig& c) {
  const int64_t T = c.num_train_timesteps;
  std::vector<float> betas(static_cast<std::size_t>(T));
  if (c.trained_betas) {
    for (int64_t i = 0; i < T; ++i) betas[i] = f32((*c.trained_betas)[i]);
  } else if (c.beta_schedule == "linear") {
    Vec l = linspace(c.beta_start, c.beta_end, T);
    for (int64_t i = 0; i < T; ++i) betas[i] = f32(l[i]);
  } else if (c.beta_schedule == "scaled_linear") {
    Vec l = linspace(std::pow(c.beta_start, 0.5), std::pow(c.beta_end, 0.5), T);
    for (int64_t i = 0; i < T; ++i) betas[i] = f32(l[i] * l[i]);
  } else {
    for (int64_t i = 0; i < T; ++i) {
      double t1 = static_cast<double>(i + 1) / static_cast<double>(T), t0 = static_cast<double>(i) / static_cast<double>(T);
      betas[i] = f32(std::min(1 - alpha_bar_cosine(t1) / alpha_bar_cosine(t0), 0.999));
    }
  }
  if (c.rescale_betas_zero_snr) {
    // Lin et al. 2023, Alg. 1 (config.py rescale_zero_terminal_snr).
    Vec s(betas.size());
    double prod = 1.0;
    for (std::size_t i = 0; i < betas.size(); ++i) {
      prod *= 1.0 - static_cast<double>(betas[i]);
      s[i] = std::sqrt(prod);
    }
    double first = s.front(), last = s.back();
    for (double& v : s) v = (v - last) * (first / (first - last));
    Vec bar(s.size());
    for (std::size_t i = 0; i < s.size(); ++i) bar[i] = s[i] * s[i];
    for (std::size_t i = 0; i < s.size(); ++i) {
      double alpha = i == 0 ? bar[0] : bar[i] / bar[i - 1];
      betas[i] = f32(1.0 - alpha);
    }
  }
  return betas;
}

std::vector<float> alphas_cumprod_for(const std::vector<float>& betas) {
  std::vector<float> out(betas.size());
  double prod = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) {
    prod *= static_cast<double>(1.0f - betas[i]);
    out[i] = f32(prod);
  }
  return out;
}

// sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) in float32 (config.py train_sigmas).
std::vector<float> train_sigmas(const std::vector<float>& ac) {
  std::vector<float> s(ac.size());
  for (std::size_t i = 0; i < ac.size(); ++i) s[i] = std::sqrt((1.0f - ac[i]) / ac[i]);
  return s;
}

// config.py spaced_timesteps: descending, float64 values.
Vec spaced_timesteps(const SchedulerConfig& c, int64_t n, bool round_linspace) {
  const int64_t T = c.num_train_timesteps;
  Vec out;
  if (c.timestep_spacing == "linspace") {
    Vec l = linspace(0, static_cast<double>(T - 1), n);
    for (auto it = l.rbegin(); it != l.rend(); ++it) out.push_back(round_linspace ? rint_even(*it) : static_cast<double>(f32(*it)));
    return out;
  }
  if (c.timestep_spacing == "leading") {
    int64_t ratio = T / n;
    for (int64_t i = n - 1; i >= 0; --i) out.push_back(static_cast<double>(i * ratio + c.steps_offset));
    return out;
  }
  Vec a = arange(static_cast<double>(T), 0, -static_cast<double>(T) / static_cast<double>(n));  // trailing
  for (double v : a) out.push_back(rint_even(v) - 1);
  return out;
}

// dpm_solver.py multistep_timesteps: n + 1 points on [0, last) with the last dropped.
Vec multistep_timesteps(const SchedulerConfig& c, int64_t n, int64_t last) {
  Vec out;
  if (c.timestep_spacing == "linspace") {
    Vec l = linspace(0, static_cast<double>(last - 1), n + 1);
    for (int64_t i = n; i >= 1; --i) out.push_back(static_cast<double>(static_cast<int64_t>(rint_even(l[i]))));
    return out;
  }
  if (c.timestep_spacing == "leading") {
    int64_t ratio = last / (n + 1);
    for (int64_t i = n; i >= 1; --i) out.push_back(static_cast<double>(i * ratio + c.steps_offset));
    return out;
  }
  Vec a = arange(static_cast<double>(last), 0, -static_cast<double>(c.num_train_timesteps) / static_cast<double>(n));
  for (double v : a) out.push_back(static_cast<double>(static_cast<int64_t>(rint_even(v)) - 1));
  return out;
}

// numpy.interp(x, arange(len(fp)), fp) (fp float32 promoted to float64).
double interp_index(double x, const std::vector<float>& fp) {
  const std::size_t n = fp.size();
  if (!(x >= 0)) return fp[0];  // left of the table (numpy: fp[0]); NaN stays out of our inputs
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  std::size_t j = static_cast<std::size_t>(x);  // xp[j] <= x < xp[j + 1]
  if (x == static_cast<double>(j)) return fp[j];
  double slope = (static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j])) / 1.0;
  double r = slope * (x - static_cast<double>(j)) + static_cast<double>(fp[j]);
  if (std::isnan(r)) r = slope * (x - static_cast<double>(j + 1)) + static_cast<double>(fp[j + 1]);
  return r;
}

// sigmas.py karras_sigmas (Karras et al. 2022, eq. 5, rho = 7).
Vec karras_sigmas(double sigma_min, double sigma_max, int64_t n) {
  Vec ramp = linspace(0, 1, n);
  double min_inv_rho = std::pow(sigma_min, 1 / 7.0);
  double max_inv_rho = std::pow(sigma_max, 1 / 7.0);
  Vec out(ramp.size());
  for (std::size_t i = 0; i < ramp.size(); ++i) out[i] = std::pow(max_inv_rho + ramp[i] * (min_inv_rho - max_inv_rho), 7.0);
  return out;
}

// sigmas.py sigma_to_t: fractional timesteps by interpolating log sigma in the (float32) training table.
// `f64_table`: the table was cast to float64 first (dpm_2s_ancestral.py), so its differences are float64 too;
// a float64 table (F = double, dpm_sde.py) always subtracts in float64.
template <class F>
Vec sigma_to_t(const Vec& sigmas, const std::vector<F>& log_sigmas, bool f64_table = false) {
  const std::size_t T = log_sigmas.size();
  Vec out(sigmas.size());
  for (std::size_t k = 0; k < sigmas.size(); ++k) {
    double log_sigma = std::log(std::max(sigmas[k], 1e-10));
    // argmax of the cumulative count of log_sigmas <= log_sigma: the last such index, or 0.
    std::size_t low = 0;
    int64_t count = 0, best = 0;
    for (std::size_t j = 0; j < T; ++j) {
      if (log_sigma - static_cast<double>(log_sigmas[j]) >= 0) ++count;
      if (count > best) {
        best = count;
        low = j;
      }
    }
    low = std::min(low, T - 2);
    std::size_t high = low + 1;
    F lo = log_sigmas[low], hi = log_sigmas[high];
    double diff = f64_table ? static_cast<double>(lo) - static_cast<double>(hi) : static_cast<double>(lo - hi);
    double w = (static_cast<double>(lo) - log_sigma) / diff;
    w = std::min(std::max(w, 0.0), 1.0);
    out[k] = (1 - w) * static_cast<double>(low) + w * static_cast<double>(high);
  }
  return out;
}

std::vector<float> log_f32(const std::vector<float>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = std::log(v[i]);
  return out;
}

// sigmas.py interpolated_sigmas: float32 timesteps (not rounded), training sigmas interpolated (float64).
std::pair<Vec, Vec> interpolated_sigmas(const SchedulerConfig& c, const std::vector<float>& ac, int64_t n) {
  Vec t = spaced_timesteps(c, n, false);
  for (double& v : t) v = static_cast<double>(f32(v));
  std::vector<float> ts = train_sigmas(ac);
  Vec s(t.size());
  for (std::size_t i = 0; i < t.size(); ++i) s[i] = interp_index(t[i], ts);
  return {t, s};
}

// sigmas.py discrete_sigmas (Euler, LMS, Heun), without the tail.
std::pair<Vec, Vec> discrete_sigmas(const SchedulerConfig& c, const std::vector<float>& ac, int64_t n, bool config_range) {
  auto [t, s] = interpolated_sigmas(c, ac, n);
  if (c.use_karras_sigmas) {
    double sigma_min = s.back(), sigma_max = s.front();
    if (config_range) {
      if (c.sigma_min) sigma_min = *c.sigma_min;
      if (c.sigma_max) sigma_max = *c.sigma_max;
    }
    s = karras_sigmas(sigma_min, sigma_max, n);
    t = sigma_to_t(s, log_f32(train_sigmas(ac)));
    for (double& v : t) v = static_cast<double>(f32(v));
  }
  return {t, s};
}

Vec to_f32_table(const Vec& v) {
  Vec out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(f32(v[i]));
  return out;
}

// Heun's sigma table (heun.py): the first sigma, each inner one twice (the step's two calls), then the tail 0.
// DPM++ SDE's two calls per step read it too.
Vec heun_sigma_table(const Vec& s) {
  Vec sig = {s[0]};
  for (std::size_t i = 1; i + 1 < s.size(); ++i) {
    sig.push_back(s[i]);
    sig.push_back(s[i]);
  }
  sig.push_back(s.back());
  return sig;
}

// ---- shared step maths (base.py) ----

void x0_and_eps(const std::string& pred, const Vec& m, const Vec& x, double alpha_prod_t, Vec* x0, Vec* eps) {
  const double a = std::sqrt(alpha_prod_t), b = std::sqrt(1.0 - alpha_prod_t);
  const std::size_t n = x.size();
  if (x0) x0->resize(n);
  if (eps) eps->resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (pred == "epsilon") {
      if (x0) (*x0)[i] = (x[i] - b * m[i]) / a;
      if (eps) (*eps)[i] = m[i];
    } else if (pred == "v_prediction") {
      if (x0) (*x0)[i] = a * x[i] - b * m[i];
      if (eps) (*eps)[i] = a * m[i] + b * x[i];
    } else {
      if (x0) (*x0)[i] = m[i];
      if (eps) (*eps)[i] = (x[i] - a * m[i]) / b;
    }
  }
}

Vec x0_from_sigma(const std::string& pred, const Vec& m, const Vec& x, double sigma) {
  Vec out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (pred == "epsilon") out[i] = x[i] - sigma * m[i];
    else if (pred == "v_prediction") out[i] = m[i] * (-sigma / std::sqrt(sigma * sigma + 1)) + x[i] / (sigma * sigma + 1);
    else out[i] = m[i];
  }
  return out;
}

// numpy.quantile(values, q) with the default linear method.
double quantile(Vec values, double q) {
  std::sort(values.begin(), values.end());
  double virt = (static_cast<double>(values.size()) - 1) * q;
  std::size_t lo = static_cast<std::size_t>(std::floor(virt));
  std::size_t hi = std::min(lo + 1, values.size() - 1);
  double t = virt - static_cast<double>(lo);
  double a = values[lo], b = values[hi], diff = b - a;
  return t >= 0.5 ? b - diff * (1 - t) : a + diff * t;
}

// base.py dynamic_threshold (Saharia et al. 2022, Sec. 2.3), per batch row.
void dynamic_threshold(Vec& x0, const std::vector<int64_t>& shape, double ratio, double max_value) {
  const std::size_t rows = shape.empty() ? 1 : static_cast<std::size_t>(shape[0]);
  const std::size_t per = rows ? x0.size() / rows : 0;
  for (std::size_t r = 0; r < rows; ++r) {
    Vec a(per);
    for (std::size_t i = 0; i < per; ++i) a[i] = std::fabs(x0[r * per + i]);
    double s = std::min(std::max(quantile(a, ratio), 1.0), max_value);
    for (std::size_t i = 0; i < per; ++i) {
      double v = x0[r * per + i];
      x0[r * per + i] = std::min(std::max(v, -s), s) / s;
    }
  }
}

void clip_or_threshold(Vec& x0, const std::vector<int64_t>& shape, const SchedulerConfig& c) {
  if (c.thresholding) {
    dynamic_threshold(x0, shape, c.dynamic_thresholding_ratio, c.sample_max_value);
  } else if (c.clip_sample) {
    for (double& v : x0) v = std::min(std::max(v, -c.clip_sample_range), c.clip_sample_range);
  }
}

std::pair<double, double> vp(double sigma) {
  double alpha = 1.0 / std::sqrt(sigma * sigma + 1);
  return {alpha, sigma * alpha};
}

}  // namespace

// ---- schedulers (registry.py) ---------------------------------------------------------------------------

enum class Cls { DDPM, DDIM, Euler, EulerA, DPM, PNDM, LMS, UniPC, Heun, LCM, TCD, DPM2SA, DPMSDE };

struct Scheduler::Kind {
  Cls cls;
  double eta = 0.0;                   // ddim's eta, tcd's gamma, dpmpp-2s-a's eta
  double final_alpha_cumprod = 1.0;   // ddim, pndm
};

namespace {

struct ClassInfo {
  const char* diffusers;
  std::vector<std::string> prediction_types;
  bool terminal_floor;
  const char* zero_snr_obstacle;  // "" when it can
  std::vector<std::string> solver_types;
};

const ClassInfo& info(Cls c) {
  static const ClassInfo ddpm{"DDPMScheduler", kPredictionTypes, false, "", {}};
  static const ClassInfo ddim{"DDIMScheduler", kPredictionTypes, false, "", {}};
  static const ClassInfo euler{"EulerDiscreteScheduler", kPredictionTypes, true, "", {}};
  static const ClassInfo eulera{"EulerAncestralDiscreteScheduler", {"epsilon", "v_prediction"}, true, "", {}};
  static const ClassInfo dpm{"DPMSolverMultistepScheduler", kPredictionTypes, true, "", {"midpoint", "heun"}};
  static const ClassInfo pndm{"PNDMScheduler", {"epsilon", "v_prediction"}, false,
                              "its PLMS steps combine noise predictions of different steps and divide them by "
                              "sqrt(alpha_bar_T), which is 0 there",
                              {}};
  static const ClassInfo lms{"LMSDiscreteScheduler", kPredictionTypes, false,
                             "its fourth-order multistep steps are unstable across the zero-SNR noise range (sigma "
                             "from 4096 down): on the default model some images come out as noise even at 50 steps",
                             {}};
  static const ClassInfo unipc{"UniPCMultistepScheduler", kPredictionTypes, true, "", {"bh2", "bh1"}};
  static const ClassInfo heun{"HeunDiscreteScheduler", kPredictionTypes, false,
                              "diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr option, so there is no "
                              "such Heun to match",
                              {}};
  static const ClassInfo lcm{"LCMScheduler", kPredictionTypes, false, "", {}};
  static const ClassInfo tcd{"TCDScheduler", kPredictionTypes, false, "", {}};
  static const ClassInfo dpm2sa{"", {"epsilon", "v_prediction"}, true, "", {}};  // k-diffusion's, no diffusers class
  static const ClassInfo dpmsde{"DPMSolverSDEScheduler", {"epsilon", "v_prediction"}, false,
                                "diffusers' DPMSolverSDEScheduler has no rescale_betas_zero_snr option, so there is no "
                                "such DPM++ SDE to match",
                                {}};
  switch (c) {
    case Cls::DPMSDE: return dpmsde;
    case Cls::DPM2SA: return dpm2sa;
    case Cls::TCD: return tcd;
    case Cls::LCM: return lcm;
    case Cls::DDPM: return ddpm;
    case Cls::DDIM: return ddim;
    case Cls::Euler: return euler;
    case Cls::EulerA: return eulera;
    case Cls::DPM: return dpm;
    case Cls::PNDM: return pndm;
    case Cls::LMS: return lms;
    case Cls::UniPC: return unipc;
    case Cls::Heun: return heun;
  }
  return ddim;
}

struct Registered {
  const char* name;
  Cls cls;
};
const std::vector<Registered>& registry() {
  static const std::vector<Registered> r = {
      {"ddpm", Cls::DDPM},       {"ddim", Cls::DDIM},
      {"euler", Cls::Euler},     {"euler-karras", Cls::Euler},
      {"euler-a", Cls::EulerA},  {"dpmpp-2m", Cls::DPM},
      {"dpmpp-2m-karras", Cls::DPM}, {"dpmpp-2m-sde", Cls::DPM},
      {"dpmpp-2m-sde-karras", Cls::DPM}, {"pndm", Cls::PNDM},
      {"lms", Cls::LMS},         {"lms-karras", Cls::LMS},
      {"unipc", Cls::UniPC},     {"unipc-karras", Cls::UniPC},
      {"heun", Cls::Heun},       {"heun-karras", Cls::Heun},
      {"lcm", Cls::LCM},
      {"tcd", Cls::TCD},         {"dpmpp-2s-a", Cls::DPM2SA},
      {"dpmpp-sde", Cls::DPMSDE}, {"dpmpp-sde-karras", Cls::DPMSDE},
  };
  return r;
}

std::string py_list(std::vector<std::string> items, bool sort) {
  if (sort) std::sort(items.begin(), items.end());
  std::string s = "[";
  for (std::size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + py_str_repr(items[i]);
  return s + "]";
}

}  // namespace

namespace {
Vec consistency_timesteps(const Scheduler& s, int64_t n, double strength);
}

const std::vector<std::string>& scheduler_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& r : registry()) n.push_back(r.name);
    return n;
  }();
  return names;
}

Scheduler::Scheduler(std::string name, std::string diffusers_class, SchedulerConfig config, std::shared_ptr<const Kind> kind)
    : name_(std::move(name)), diffusers_class_(std::move(diffusers_class)), config_(std::move(config)), kind_(std::move(kind)) {
  betas_ = betas_for(config_);
  alphas_cumprod_ = alphas_cumprod_for(betas_);
  if (config_.rescale_betas_zero_snr && info(kind_->cls).terminal_floor) alphas_cumprod_.back() = std::ldexp(1.0f, -24);
}

std::shared_ptr<const Scheduler> Scheduler::make(const std::string& name, const SchedulerConfig& config_in,
                                                 std::optional<double> option) {
  const Registered* reg = nullptr;
  for (const auto& r : registry())
    if (name == r.name) reg = &r;
  if (!reg) throw config_error("unknown scheduler " + py_str_repr(name) + "; valid names are " + py_list(scheduler_names(), true));
  if (option && reg->cls != Cls::DDIM && reg->cls != Cls::TCD && reg->cls != Cls::DPM2SA)
    throw config_error("scheduler " + py_str_repr(name) + " does not take options ['eta']; it takes []");
  config_in.validate();
  SchedulerConfig c = config_in;
  // The name fixes these fields over the model's config (registry.py _fixed / karras_pair).
  if (name == "euler") c.use_karras_sigmas = false;
  if (name == "euler-karras") c.use_karras_sigmas = true;
  if (reg->cls == Cls::DPMSDE) c.use_karras_sigmas = name == "dpmpp-sde-karras";
  if (reg->cls == Cls::Heun) c.use_karras_sigmas = name == "heun-karras";
  if (reg->cls == Cls::LMS) c.use_karras_sigmas = name == "lms-karras";
  if (reg->cls == Cls::UniPC) c.use_karras_sigmas = name == "unipc-karras";
  if (reg->cls == Cls::DPM) {
    c.solver_order = 2;
    c.use_karras_sigmas = name.find("karras") != std::string::npos;
    c.algorithm_type = name.find("sde") != std::string::npos ? "sde-dpmsolver++" : "dpmsolver++";
  }
  const ClassInfo& ci = info(reg->cls);
  if (!ci.solver_types.empty() && !contains(ci.solver_types, c.solver_type)) c.solver_type = ci.solver_types[0];
  if (!contains(ci.prediction_types, c.prediction_type))
    throw config_error(name + " does not support prediction_type=" + py_str_repr(c.prediction_type) + "; use one of " +
                       py_list(ci.prediction_types, false));
  if (c.rescale_betas_zero_snr && *ci.zero_snr_obstacle)
    throw config_error(name + " (" + ci.diffusers + ") cannot sample a zero-terminal-SNR schedule (rescale_betas_zero_snr): " +
                       ci.zero_snr_obstacle);
  auto kind = std::make_shared<Kind>();
  kind->cls = reg->cls;
  if (reg->cls == Cls::DDIM) {
    double e = option.value_or(0.0);
    if (!(e >= 0))
      throw config_error("ddim: eta must be a number >= 0 (0: deterministic DDIM), got " + py_float_repr(e));
    kind->eta = e;
  }
  if (reg->cls == Cls::TCD) {
    double gamma = option.value_or(0.3);  // the paper's and diffusers' default
    if (!(gamma >= 0 && gamma <= 1))
      throw config_error("tcd: gamma must be a number in [0, 1] (0: deterministic), got " + py_float_repr(gamma));
    kind->eta = gamma;
  }
  if (reg->cls == Cls::DPM2SA) {
    double e = option.value_or(1.0);  // k-diffusion's default
    if (!(e >= 0 && e <= 1))
      throw config_error("dpmpp-2s-a: eta must be a number in [0, 1] (0: no ancestral noise), got " + py_float_repr(e));
    kind->eta = e;
  }
  if (reg->cls == Cls::UniPC && !c.lower_order_final && c.final_sigmas_type == "zero" && c.solver_order > 1)
    throw config_error(
        "unipc with lower_order_final=false and final_sigmas_type='zero' divides by zero on its last step; "
        "set lower_order_final=true or final_sigmas_type='sigma_min'");
  auto s = std::make_shared<Scheduler>(name, ci.diffusers, c, kind);
  if (reg->cls == Cls::LCM || reg->cls == Cls::TCD) consistency_timesteps(*s, 1, 1.0);  // refuses a bad schedule up front
  if (reg->cls == Cls::DDIM || reg->cls == Cls::PNDM)
    kind->final_alpha_cumprod = c.set_alpha_to_one ? 1.0 : static_cast<double>(s->alphas_cumprod_[0]);
  return s;
}

bool Scheduler::is_stochastic() const {
  switch (kind_->cls) {
    case Cls::DDPM:
    case Cls::DPMSDE:
    case Cls::LCM:
    case Cls::EulerA: return true;
    case Cls::DDIM:
    case Cls::DPM2SA:
    case Cls::TCD: return kind_->eta > 0;
    case Cls::DPM: return config_.algorithm_type == "sde-dpmsolver++";
    default: return false;
  }
}

int64_t Scheduler::fewest_sound_steps() const {
  const SchedulerConfig& c = config_;
  switch (kind_->cls) {
    case Cls::Euler: return c.use_karras_sigmas && c.rescale_betas_zero_snr ? 15 : 0;
    case Cls::DPM:
      if (!c.rescale_betas_zero_snr) return 0;
      if (c.use_karras_sigmas && c.solver_order > 1) return 40;
      return is_stochastic() ? 15 : 0;
    case Cls::UniPC: return c.rescale_betas_zero_snr ? (c.use_karras_sigmas ? 40 : 12) : 0;  // as runtime/schedulers/unipc.py
    case Cls::LCM: return c.rescale_betas_zero_snr ? 8 : 0;  // as runtime/schedulers/lcm.py
    case Cls::TCD: return c.rescale_betas_zero_snr ? 20 : 0;  // as runtime/schedulers/tcd.py
    case Cls::DPM2SA: return c.rescale_betas_zero_snr ? 15 : 0;  // as runtime/schedulers/dpm_2s_ancestral.py
    default: return 0;
  }
}

UsableSchedulers usable_schedulers(const SchedulerConfig& config) {
  UsableSchedulers out;
  for (const auto& name : scheduler_names()) {
    try {
      out.usable.emplace_back(name, Scheduler::make(name, config));
    } catch (const SchedulerConfigError& e) {
      out.unusable[name] = e.what();
    }
  }
  return out;
}

// ---- runs -----------------------------------------------------------------------------------------------

SchedulerRun::SchedulerRun(std::shared_ptr<const Scheduler> scheduler, std::vector<double> all_timesteps, int64_t n)
    : scheduler_(std::move(scheduler)), all_timesteps_(std::move(all_timesteps)), num_inference_steps_(n) {
  timesteps_ = all_timesteps_;
}

bool SchedulerRun::step_draws_noise(int64_t) const { return false; }
void SchedulerRun::scale_input(std::vector<double>&, int64_t) const {}

void SchedulerRun::do_add_noise(std::vector<double>& x0, const std::vector<double>& z, int64_t g) const {
  // q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Ho et al. 2020 eq. 4.
  double a = static_cast<double>(scheduler_->alphas_cumprod()[static_cast<std::size_t>(all_timesteps_[g])]);
  double sa = std::sqrt(a), sb = std::sqrt(1.0 - a);
  for (std::size_t i = 0; i < x0.size(); ++i) x0[i] = sa * x0[i] + sb * z[i];
}

std::size_t SchedulerRun::global_index(std::size_t i, const char* what) const {
  if (i >= timesteps_.size())
    throw SchedulerStepError(std::string(what) + ": step index " + std::to_string(i) + " is out of range for a run of " +
                             std::to_string(timesteps_.size()) + " steps; pass 0 <= i < " + std::to_string(timesteps_.size()));
  return static_cast<std::size_t>(begin_index_) + i;
}

std::vector<int64_t> SchedulerRun::noise_steps() const {
  std::vector<int64_t> out;
  for (std::size_t i = 0; i < timesteps_.size(); ++i)
    if (step_draws_noise(begin_index_ + static_cast<int64_t>(i))) out.push_back(static_cast<int64_t>(i));
  return out;
}

static Vec to_f64(const Tensor& t) { return Vec(t.data.begin(), t.data.end()); }

static Tensor to_tensor(const std::vector<int64_t>& shape, const Vec& v) {
  std::vector<float> d(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d[i] = static_cast<float>(v[i]);
  return Tensor(shape, std::move(d));
}

Tensor SchedulerRun::scale_model_input(const Tensor& sample, std::size_t i) const {
  std::size_t g = global_index(i, "scale_model_input");
  Vec x = to_f64(sample);
  scale_input(x, static_cast<int64_t>(g));
  return to_tensor(sample.shape, x);
}

Tensor SchedulerRun::step(const Tensor& model_output, std::size_t i, const Tensor& sample, Generator* rng, const Tensor* noise) {
  std::size_t g = global_index(i, "step");
  if (rng && noise) throw SchedulerStepError("pass either a generator or noise to step, not both");
  if (multistep()) {
    if (i == 0) {
      reset();
    } else if (static_cast<int64_t>(i) != next_index_) {
      throw SchedulerStepError(scheduler_->name() + " keeps a history of earlier steps: call step with i = 0, 1, 2, ... in order (expected " +
                               std::to_string(next_index_) + ", got " + std::to_string(i) + "), or start a new run");
    }
  }
  Vec x = to_f64(sample);
  Vec pv;
  Vec m = prediction(model_output, sample, &pv);
  const std::vector<int64_t>& shape = sample.shape;
  Draw draw = [&]() -> Vec {
    if (noise) {
      if (noise->shape != shape)
        throw SchedulerStepError("noise has shape " + shape_str(noise->shape) + " but the sample has " + shape_str(shape));
      return to_f64(*noise);
    }
    if (rng) return to_f64(rng->standard_normal(shape));
    throw SchedulerStepError(scheduler_->name() + " step " + std::to_string(i) +
                             " is stochastic: pass a Generator (default_rng(seed)) or the step's noise");
  };
  Vec out = do_step(m, static_cast<int64_t>(g), static_cast<int64_t>(i), x, shape, draw, pv.empty() ? nullptr : &pv);
  next_index_ = static_cast<int64_t>(i) + 1;
  return to_tensor(shape, out);
}

Vec SchedulerRun::prediction(const Tensor& model_output, const Tensor& sample, Vec* pv) const {
  Vec m = to_f64(model_output);
  if (model_output.shape == sample.shape) return m;
  const auto& ms = model_output.shape;
  const auto& xs = sample.shape;
  const auto& vt = config().variance_type;
  bool split = accepts_learned_variance() && vt && (*vt == "learned" || *vt == "learned_range") && xs.size() > 1 &&
               ms.size() == xs.size() && ms[0] == xs[0] && ms[1] == 2 * xs[1] && std::equal(ms.begin() + 2, ms.end(), xs.begin() + 2);
  if (!split)
    throw SchedulerStepError("model_output has shape " + shape_str(ms) + " but the sample has " + shape_str(xs) + "; they must match");
  // (B, 2C, ...) -> prediction (B, C, ...) and variance (B, C, ...)
  std::size_t n = sample.data.size(), rows = static_cast<std::size_t>(xs[0]), half = n / rows;
  Vec pred(n);
  pv->resize(n);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t k = 0; k < half; ++k) {
      pred[r * half + k] = m[r * 2 * half + k];
      (*pv)[r * half + k] = m[r * 2 * half + half + k];
    }
  return pred;
}

Vec SchedulerRun::do_denoised(const Vec& m, int64_t g, const Vec& x) const {
  double a = static_cast<double>(scheduler_->alphas_cumprod()[static_cast<std::size_t>(all_timesteps_[g])]);
  Vec x0;
  x0_and_eps(config().prediction_type, m, x, a, &x0, nullptr);
  return x0;
}

Tensor SchedulerRun::denoised(const Tensor& model_output, std::size_t i, const Tensor& sample) const {
  std::size_t g = global_index(i, "denoised");
  Vec pv;
  Vec m = prediction(model_output, sample, &pv);
  return to_tensor(sample.shape, do_denoised(m, static_cast<int64_t>(g), to_f64(sample)));
}

Tensor SchedulerRun::add_noise(const Tensor& original, const Tensor& noise, std::size_t i) const {
  std::size_t g = global_index(i, "add_noise");
  if (noise.shape != original.shape)
    throw SchedulerStepError("noise has shape " + shape_str(noise.shape) + " but the samples have " + shape_str(original.shape));
  Vec x0 = to_f64(original);
  do_add_noise(x0, to_f64(noise), static_cast<int64_t>(g));
  return to_tensor(original.shape, x0);
}

std::unique_ptr<SchedulerRun> SchedulerRun::with_strength(double strength) const {
  if (!(strength > 0 && strength <= 1))
    throw SchedulerConfigError("strength must be in (0, 1], got " + py_float_repr(strength));
  const int64_t n = num_inference_steps_;
  const int64_t init_timestep = std::min(static_cast<int64_t>(static_cast<double>(n) * strength), n);
  const int64_t begin = std::max<int64_t>(n - init_timestep, 0) * order();
  if (begin >= static_cast<int64_t>(all_timesteps_.size()))
    throw SchedulerConfigError("strength " + py_float_repr(strength) + " with " + std::to_string(n) +
                               " steps leaves no denoising step; raise strength or num_inference_steps");
  std::unique_ptr<SchedulerRun> run = clone();
  run->begin_index_ = begin;
  run->timesteps_.assign(all_timesteps_.begin() + begin, all_timesteps_.end());
  run->reset();
  return run;
}

namespace {

template <class Derived>
class RunBase : public SchedulerRun {
 public:
  RunBase(std::shared_ptr<const Scheduler> s, Vec ts, int64_t n) : SchedulerRun(std::move(s), std::move(ts), n) {}

 protected:
  std::unique_ptr<SchedulerRun> clone() const override { return std::make_unique<Derived>(static_cast<const Derived&>(*this)); }
  const Scheduler::Kind& kind() const { return *kind_; }
  std::shared_ptr<const Scheduler::Kind> kind_;
  void check_timesteps(const Vec& ts) const {
    // Schedulers that index alphas_cumprod by timestep ("leading" + steps_offset can step past T - 1).
    if (ts.empty()) return;
    double lo = *std::min_element(ts.begin(), ts.end()), hi = *std::max_element(ts.begin(), ts.end());
    const int64_t T = config().num_train_timesteps;
    if (hi > static_cast<double>(T - 1) || lo < 0)
      throw SchedulerConfigError(scheduler_->name() + ": timesteps " + std::to_string(static_cast<int64_t>(lo)) + ".." +
                                 std::to_string(static_cast<int64_t>(hi)) + " fall outside the training range 0.." +
                                 std::to_string(T - 1) + "; lower steps_offset or num_inference_steps");
  }
  double ac(double t) const { return static_cast<double>(scheduler_->alphas_cumprod()[static_cast<std::size_t>(t)]); }

 public:
  void set_kind(std::shared_ptr<const Scheduler::Kind> k) { kind_ = std::move(k); }
};

// ---- DDIM (Song et al. 2021, eq. 12 and 16) ----
class DDIMRun : public RunBase<DDIMRun> {
 public:
  using RunBase::RunBase;
  std::pair<double, double> alphas(int64_t g) const {
    double t = all_timesteps_[g];
    // diffusers steps back by T // n whatever the spacing, not to the next listed timestep.
    int64_t prev_t = static_cast<int64_t>(t) - config().num_train_timesteps / num_inference_steps_;
    return {ac(t), prev_t >= 0 ? ac(static_cast<double>(prev_t)) : kind().final_alpha_cumprod};
  }

 protected:
  bool step_draws_noise(int64_t) const override { return kind().eta > 0; }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>& shape, const Draw& draw,
              const Vec*) override {
    auto [a_t, a_prev] = alphas(g);
    Vec x0, eps;
    x0_and_eps(config().prediction_type, m, x, a_t, &x0, &eps);
    clip_or_threshold(x0, shape, config());
    double variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev);
    double sigma_t = kind().eta * std::sqrt(variance);
    double dir = std::sqrt(1 - a_prev - sigma_t * sigma_t);
    double sa = std::sqrt(a_prev);
    Vec prev(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) prev[i] = sa * x0[i] + dir * eps[i];
    if (kind().eta > 0) {
      Vec z = draw();
      for (std::size_t i = 0; i < x.size(); ++i) prev[i] = prev[i] + sigma_t * z[i];
    }
    return prev;
  }
};

// ---- DDPM (Ho et al. 2020, eq. 6-7) ----
class DDPMRun : public RunBase<DDPMRun> {
 public:
  using RunBase::RunBase;

 protected:
  bool accepts_learned_variance() const override { return true; }
  bool step_draws_noise(int64_t g) const override { return all_timesteps_[g] != 0; }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>& shape, const Draw& draw,
              const Vec* pv) override {
    double t = all_timesteps_[g];
    double a_t = ac(t);
    double a_prev = g + 1 < static_cast<int64_t>(all_timesteps_.size()) && all_timesteps_[g + 1] >= 0 ? ac(all_timesteps_[g + 1]) : 1.0;
    double alpha_t = a_t / a_prev;
    double beta_t = 1 - alpha_t;
    Vec x0;
    x0_and_eps(config().prediction_type, m, x, a_t, &x0, nullptr);
    clip_or_threshold(x0, shape, config());
    double x0_coeff = std::sqrt(a_prev) * beta_t / (1 - a_t);
    double xt_coeff = std::sqrt(alpha_t) * (1 - a_prev) / (1 - a_t);
    Vec mean(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) mean[i] = x0_coeff * x0[i] + xt_coeff * x[i];
    if (t == 0) return mean;
    double beta_tilde = std::max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20);
    std::string kindv = config().variance_type.value_or("fixed_small");
    if ((kindv == "learned" || kindv == "learned_range") && !pv)
      throw SchedulerStepError("ddpm: variance_type=" + py_str_repr(kindv) + " needs a model output with twice the sample's channels");
    Vec z = draw();
    for (std::size_t i = 0; i < x.size(); ++i) {
      double std_;
      if (kindv == "fixed_small") std_ = std::sqrt(beta_tilde);
      else if (kindv == "fixed_small_log") std_ = std::exp(0.5 * std::log(beta_tilde));
      else if (kindv == "fixed_large") std_ = std::sqrt(beta_t);
      else if (kindv == "learned") std_ = std::sqrt((*pv)[i]);
      else {
        double frac = ((*pv)[i] + 1) / 2;
        double log_var = frac * std::log(beta_t) + (1 - frac) * std::log(beta_tilde);
        std_ = std::exp(0.5 * log_var);
      }
      mean[i] = mean[i] + std_ * z[i];
    }
    return mean;
  }
};

// ---- sigma runs (Euler, Euler a, LMS, Heun): VE conventions ----
template <class Derived>
class SigmaRunT : public RunBase<Derived> {
 public:
  SigmaRunT(std::shared_ptr<const Scheduler> s, Vec ts, int64_t n, Vec sigmas) : RunBase<Derived>(std::move(s), std::move(ts), n) {
    this->sigmas_ = std::move(sigmas);
  }
  double init_noise_sigma() const override {
    double sigma_max = *std::max_element(this->sigmas_.begin(), this->sigmas_.end());
    const std::string& sp = this->config().timestep_spacing;
    if (sp == "linspace" || sp == "trailing") return sigma_max;
    float s = static_cast<float>(sigma_max);
    return static_cast<double>(std::sqrt(s * s + 1.0f));  // float32, as diffusers computes it
  }

 protected:
  // The VE noise level of the sample the model sees at entry g.
  virtual double model_sigma(int64_t g) const { return this->sigmas_[g]; }
  void scale_input(Vec& x, int64_t g) const override {
    double sigma = model_sigma(g);
    double d = std::sqrt(sigma * sigma + 1);
    for (double& v : x) v = v / d;
  }
  Vec do_denoised(const Vec& m, int64_t g, const Vec& x) const override {
    return x0_from_sigma(this->config().prediction_type, m, x, model_sigma(g));
  }
  void do_add_noise(Vec& x0, const Vec& z, int64_t g) const override {
    double sigma = this->sigmas_[g];
    for (std::size_t i = 0; i < x0.size(); ++i) x0[i] = x0[i] + z[i] * sigma;
  }
};

// ---- VP sigma runs (DPM-Solver++, UniPC) ----
template <class Derived>
class VPSigmaRunT : public SigmaRunT<Derived> {
 public:
  using SigmaRunT<Derived>::SigmaRunT;
  double init_noise_sigma() const override { return 1.0; }

 protected:
  void scale_input(Vec&, int64_t) const override {}
  Vec do_denoised(const Vec& m, int64_t g, const Vec& x) const override {
    double alpha_t = vp(this->sigmas_[g]).first;
    Vec x0;
    x0_and_eps(this->config().prediction_type, m, x, alpha_t * alpha_t, &x0, nullptr);
    return x0;
  }
  void do_add_noise(Vec& x0, const Vec& z, int64_t g) const override {
    auto [alpha_t, sigma_t] = vp(this->sigmas_[g]);
    for (std::size_t i = 0; i < x0.size(); ++i) x0[i] = alpha_t * x0[i] + sigma_t * z[i];
  }
};

// ---- Euler (Karras et al. 2022, Alg. 2 without churn) ----
class EulerRun : public SigmaRunT<EulerRun> {
 public:
  using SigmaRunT::SigmaRunT;

 protected:
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>&, const Draw&, const Vec*) override {
    double sigma = sigmas_[g], sigma_next = sigmas_[g + 1];
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, sigma);
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      double d = (x[i] - x0[i]) / sigma;
      out[i] = x[i] + d * (sigma_next - sigma);
    }
    return out;
  }
};

// ---- Euler ancestral ----
class EulerARun : public SigmaRunT<EulerARun> {
 public:
  using SigmaRunT::SigmaRunT;

 protected:
  std::pair<double, double> split(int64_t g) const {
    double s = sigmas_[g], s_next = sigmas_[g + 1];
    double sigma_up = std::sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s));
    double sigma_down = std::sqrt(std::max(s_next * s_next - sigma_up * sigma_up, 0.0));
    return {sigma_up, sigma_down};
  }
  bool step_draws_noise(int64_t g) const override { return split(g).first > 0; }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>&, const Draw& draw, const Vec*) override {
    double s = sigmas_[g];
    auto [sigma_up, sigma_down] = split(g);
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, s);
    Vec prev(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      double d = (x[i] - x0[i]) / s;
      prev[i] = x[i] + d * (sigma_down - s);
    }
    if (sigma_up > 0) {
      Vec z = draw();
      for (std::size_t i = 0; i < x.size(); ++i) prev[i] = prev[i] + z[i] * sigma_up;
    }
    return prev;
  }
};

// ---- two UNet calls per step, as two entries of the run (Heun, DPM++ 2S a, DPM++ SDE; base.py TwoStageRun) ----
// `first` begins a step and says whether it needs the second call (a last step to sigma 0 ends in one);
// `second` finishes it with what `first` kept in the run's members.
template <class Derived>
class TwoStageRunT : public SigmaRunT<Derived> {
 public:
  using SigmaRunT<Derived>::SigmaRunT;
  using Draw = SchedulerRun::Draw;  // not found through the dependent base
  int64_t order() const override { return 2; }

 protected:
  bool multistep() const override { return true; }
  void reset_history() override { pending_ = false; }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>&, const Draw& draw, const Vec*) override {
    if (!pending_) return first(m, g, x, draw, pending_);  // a run (also with_strength's) starts on a first call
    pending_ = false;
    return second(m, g, x, draw);
  }
  virtual Vec first(const Vec& m, int64_t g, const Vec& x, const Draw& draw, bool& needs_second) = 0;
  virtual Vec second(const Vec& m, int64_t g, const Vec& x, const Draw& draw) = 0;
  bool pending_ = false;
};

// ---- Heun (Karras et al. 2022, Alg. 1 without churn) ----
class HeunRun : public TwoStageRunT<HeunRun> {
 public:
  using TwoStageRunT::TwoStageRunT;

 protected:
  Vec slope(const Vec& m, const Vec& x, double sigma) const {
    const SchedulerConfig& c = config();
    Vec x0 = x0_from_sigma(c.prediction_type, m, x, sigma);
    if (c.clip_sample)
      for (double& v : x0) v = std::min(std::max(v, -c.clip_sample_range), c.clip_sample_range);
    Vec d(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) d[i] = (x[i] - x0[i]) / sigma;
    return d;
  }
  Vec first(const Vec& m, int64_t g, const Vec& x, const Draw&, bool& needs_second) override {  // Euler
    double sigma = sigmas_[g];
    pd_ = slope(m, x, sigma);
    pdt_ = sigmas_[g + 1] - sigma;
    px_ = x;
    needs_second = true;
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] + pd_[i] * pdt_;
    return out;
  }
  Vec second(const Vec& m, int64_t g, const Vec& x, const Draw&) override {  // Heun: the mean of both slopes
    Vec d = slope(m, x, sigmas_[g]);
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = px_[i] + (pd_[i] + d[i]) / 2 * pdt_;
    return out;
  }
  Vec px_, pd_;
  double pdt_ = 0;
};

// ---- LMS (k-diffusion sample_lms) ----
constexpr int kLmsOrder = 4;

// Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j} on the nodes
// sigma_i, ..., sigma_{i-order+1} (lms.py lms_coefficient, as numpy's Polynomial computes it).
double lms_coefficient(const Vec& sigmas, int order, int64_t i, int j) {
  Vec nodes;
  for (int k = 0; k < order; ++k) nodes.push_back(sigmas[i - k]);
  Vec others;
  for (int k = 0; k < order; ++k)
    if (k != j) others.push_back(nodes[k]);
  Vec coef = {1.0};  // ascending powers
  if (!others.empty()) {
    // polyfromroots: product of (x - r); numpy multiplies pairwise, here in sequence (same to rounding).
    for (double r : others) {
      Vec next(coef.size() + 1, 0.0);
      for (std::size_t k = 0; k < coef.size(); ++k) {
        next[k] += -r * coef[k];
        next[k + 1] += coef[k];
      }
      coef.swap(next);
    }
    double denom = 1.0;
    for (double o : others) denom *= nodes[j] - o;
    for (double& v : coef) v /= denom;
  }
  Vec integ(coef.size() + 1, 0.0);
  for (std::size_t k = 0; k < coef.size(); ++k) integ[k + 1] = coef[k] / static_cast<double>(k + 1);
  auto eval = [&](double xv) {
    double c0 = integ.back();
    for (std::size_t k = integ.size() - 1; k-- > 0;) c0 = integ[k] + c0 * xv;
    return c0;
  };
  return eval(sigmas[i + 1]) - eval(sigmas[i]);
}

class LMSRun : public SigmaRunT<LMSRun> {
 public:
  using SigmaRunT::SigmaRunT;

 protected:
  bool multistep() const override { return true; }
  void reset_history() override { derivs_.clear(); }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>&, const Draw&, const Vec*) override {
    double sigma = sigmas_[g];
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, sigma);
    Vec d(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) d[i] = (x[i] - x0[i]) / sigma;
    derivs_.push_back(std::move(d));
    if (derivs_.size() > static_cast<std::size_t>(kLmsOrder)) derivs_.erase(derivs_.begin());
    int order = static_cast<int>(std::min<int64_t>(g + 1, kLmsOrder));
    int used = std::min(order, static_cast<int>(derivs_.size()));
    Vec out(x.size());
    Vec coeffs;
    for (int j = 0; j < used; ++j) coeffs.push_back(lms_coefficient(sigmas_, order, g, j));
    for (std::size_t i = 0; i < x.size(); ++i) {
      double s = 0;  // Python's sum() starts from 0
      for (int j = 0; j < used; ++j) s = s + coeffs[j] * derivs_[derivs_.size() - 1 - j][i];
      out[i] = x[i] + s;
    }
    return out;
  }
  std::vector<Vec> derivs_;
};

// ---- PNDM / PLMS (Liu et al. 2022, eq. 11-13) ----
constexpr int kPndmOrder = 4;

class PNDMRun : public RunBase<PNDMRun> {
 public:
  PNDMRun(std::shared_ptr<const Scheduler> s, Vec ts, int64_t n, Vec prk)
      : RunBase(std::move(s), std::move(ts), n), prk_(std::move(prk)) {}

 protected:
  bool multistep() const override { return true; }
  void reset_history() override {
    ets_.clear();
    cur_sample_.clear();
    has_cur_sample_ = false;
    cur_eps_.clear();
  }
  Vec do_step(const Vec& m, int64_t g, int64_t k, const Vec& x, const std::vector<int64_t>&, const Draw&, const Vec*) override {
    double t = all_timesteps_[g];
    if (k < static_cast<int64_t>(prk_.size()) && !config().skip_prk_steps) return step_prk(m, static_cast<int64_t>(t), k, x);
    return step_plms(m, static_cast<int64_t>(t), k, x);
  }

 private:
  Vec step_prk(Vec m, int64_t t, int64_t k, const Vec& x) {
    int64_t half = config().num_train_timesteps / num_inference_steps_ / 2;
    int64_t prev_t = t - (k % 2 ? 0 : half);
    t = static_cast<int64_t>(prk_[k / 4 * 4]);
    int64_t stage = k % 4;
    if (cur_eps_.empty()) cur_eps_.assign(m.size(), 0.0);
    if (stage == 0) {
      for (std::size_t i = 0; i < m.size(); ++i) cur_eps_[i] = cur_eps_[i] + m[i] / 6;
      ets_.push_back(m);
      cur_sample_ = x;
      has_cur_sample_ = true;
    } else if (stage == 1 || stage == 2) {
      for (std::size_t i = 0; i < m.size(); ++i) cur_eps_[i] = cur_eps_[i] + m[i] / 3;
    } else {
      for (std::size_t i = 0; i < m.size(); ++i) m[i] = cur_eps_[i] + m[i] / 6;
      cur_eps_.assign(m.size(), 0.0);
    }
    return transfer(has_cur_sample_ ? cur_sample_ : x, t, prev_t, m);
  }

  Vec step_plms(Vec m, int64_t t, int64_t k, Vec x) {
    if (!config().skip_prk_steps && ets_.size() < 3)
      throw SchedulerStepError(
          "pndm with skip_prk_steps=false must run its Runge-Kutta warm-up steps first; start the run at step 0 or "
          "set skip_prk_steps=true");
    int64_t delta = config().num_train_timesteps / num_inference_steps_;
    int64_t prev_t = t - delta;
    if (k != 1) {
      if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
      ets_.push_back(m);
    } else {
      prev_t = t;
      t = t + delta;
    }
    const std::size_t n = ets_.size();
    const std::size_t len = m.size();
    if (n == 1 && k == 0) {
      cur_sample_ = x;
      has_cur_sample_ = true;
    } else if (n == 1 && k == 1) {
      for (std::size_t i = 0; i < len; ++i) m[i] = (m[i] + ets_[n - 1][i]) / 2;
      x = cur_sample_;
      has_cur_sample_ = false;
      cur_sample_.clear();
    } else if (n == 2) {
      for (std::size_t i = 0; i < len; ++i) m[i] = (3 * ets_[1][i] - ets_[0][i]) / 2;
    } else if (n == 3) {
      for (std::size_t i = 0; i < len; ++i) m[i] = (23 * ets_[2][i] - 16 * ets_[1][i] + 5 * ets_[0][i]) / 12;
    } else {
      for (std::size_t i = 0; i < len; ++i)
        m[i] = (55 * ets_[n - 1][i] - 59 * ets_[n - 2][i] + 37 * ets_[n - 3][i] - 9 * ets_[n - 4][i]) / 24;
    }
    return transfer(x, t, prev_t, m);
  }

  Vec transfer(const Vec& x, int64_t t, int64_t prev_t, Vec m) const {
    double a = ac(static_cast<double>(t));
    double a_prev = prev_t >= 0 ? ac(static_cast<double>(prev_t)) : kind().final_alpha_cumprod;
    if (config().prediction_type == "v_prediction") {
      double sa = std::sqrt(a), sb = std::sqrt(1 - a);
      for (std::size_t i = 0; i < m.size(); ++i) m[i] = sa * m[i] + sb * x[i];
    }
    double denom = a * std::sqrt(1 - a_prev) + std::sqrt(a * (1 - a) * a_prev);
    double c1 = std::sqrt(a_prev / a), c2 = a_prev - a;
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c1 * x[i] - c2 * m[i] / denom;
    return out;
  }

  Vec prk_;
  std::vector<Vec> ets_;
  Vec cur_sample_, cur_eps_;
  bool has_cur_sample_ = false;
};

// ---- DPM-Solver++ (Lu et al. 2022, Alg. 2; SDE variant Sec. 5) ----
class DPMRun : public VPSigmaRunT<DPMRun> {
 public:
  using VPSigmaRunT::VPSigmaRunT;

  int solver_order_at(int64_t g, int64_t k) const {
    const SchedulerConfig& c = config();
    const int64_t n_all = static_cast<int64_t>(all_timesteps_.size());
    bool lower_order_final =
        g == n_all - 1 && (c.euler_at_final || (c.lower_order_final && n_all < 15) || c.final_sigmas_type == "zero");
    bool lower_order_second = g == n_all - 2 && c.lower_order_final && n_all < 15;
    int64_t taken = std::min<int64_t>(k, c.solver_order);
    if (c.solver_order == 1 || taken < 1 || lower_order_final) return 1;
    if (c.solver_order == 2 || taken < 2 || lower_order_second) return 2;
    return 3;
  }

 protected:
  bool multistep() const override { return true; }
  bool accepts_learned_variance() const override { return true; }
  void reset_history() override { preds_.clear(); }
  bool step_draws_noise(int64_t g) const override { return scheduler_->is_stochastic() && sigmas_[g + 1] > 0; }

  Vec do_step(const Vec& m, int64_t g, int64_t k, const Vec& x, const std::vector<int64_t>& shape, const Draw& draw,
              const Vec*) override {
    const SchedulerConfig& c = config();
    double alpha_s = vp(sigmas_[g]).first;
    Vec x0;
    x0_and_eps(c.prediction_type, m, x, alpha_s * alpha_s, &x0, nullptr);
    if (c.thresholding) dynamic_threshold(x0, shape, c.dynamic_thresholding_ratio, c.sample_max_value);
    preds_.push_back(std::move(x0));
    while (preds_.size() > static_cast<std::size_t>(c.solver_order)) preds_.erase(preds_.begin());
    int order = solver_order_at(g, k);
    double sig[4] = {0, 0, 0, 0};
    for (int j = 0; j <= order; ++j) sig[j] = sigmas_[g + 1 - j];
    const std::size_t n = x.size();
    const Vec& m0 = preds_.back();
    auto [alpha_t, sigma_t] = vp(sig[0]);
    double sigma_s0 = vp(sig[1]).second;
    Vec out(n);
    if (scheduler_->is_stochastic()) {
      double e = sig[0] / sig[1];
      double ome2 = 1.0 - e * e;
      double c1 = sigma_t / sigma_s0 * e, c2 = alpha_t * ome2;
      for (std::size_t i = 0; i < n; ++i) out[i] = c1 * x[i] + c2 * m0[i];
      if (order >= 2) {
        double lam[4];
        for (int j = 0; j <= order; ++j) lam[j] = -std::log(sig[j]);
        double h = lam[0] - lam[1], h_0 = lam[1] - lam[2];
        double r0 = h_0 / h;
        const Vec& m1 = preds_[preds_.size() - 2];
        Vec d1_0(n);
        for (std::size_t i = 0; i < n; ++i) d1_0[i] = (1.0 / r0) * (m0[i] - m1[i]);
        if (order == 2 && c.solver_type == "midpoint") {
          double cc = 0.5 * alpha_t * ome2;
          for (std::size_t i = 0; i < n; ++i) out[i] = out[i] + cc * d1_0[i];
        } else if (order == 2) {
          double cc = alpha_t * (ome2 / (-2.0 * h) + 1.0);
          for (std::size_t i = 0; i < n; ++i) out[i] = out[i] + cc * d1_0[i];
        } else {
          const Vec& m2 = preds_[preds_.size() - 3];
          double r1 = (lam[2] - lam[3]) / h;
          double ca = alpha_t * (ome2 / (-2.0 * h) + 1.0);
          double cb = alpha_t * ((ome2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
          for (std::size_t i = 0; i < n; ++i) {
            double d1_1 = (1.0 / r1) * (m1[i] - m2[i]);
            double d1 = d1_0[i] + (r0 / (r0 + r1)) * (d1_0[i] - d1_1);
            double d2 = (1.0 / (r0 + r1)) * (d1_0[i] - d1_1);
            out[i] = out[i] + ca * d1 + cb * d2;
          }
        }
      }
      if (sigma_t > 0) {
        Vec z = draw();
        double cz = sigma_t * std::sqrt(ome2);
        for (std::size_t i = 0; i < n; ++i) out[i] = out[i] + cz * z[i];
      }
      return out;
    }
    if (order == 1) {
      double exp_neg_h = sig[0] / sig[1];
      double c1 = sigma_t / sigma_s0, c2 = alpha_t * (exp_neg_h - 1.0);
      for (std::size_t i = 0; i < n; ++i) out[i] = c1 * x[i] - c2 * m0[i];
      return out;
    }
    double lam_t = -std::log(sig[0]), lam_s0 = -std::log(sig[1]), lam_s1 = -std::log(sig[2]);
    const Vec& m1 = preds_[preds_.size() - 2];
    double h = lam_t - lam_s0, h_0 = lam_s0 - lam_s1;
    double r0 = h_0 / h;
    double em1 = std::expm1(-h);
    double c1 = sigma_t / sigma_s0, c2 = alpha_t * em1;
    if (order == 2) {
      bool midpoint = c.solver_type == "midpoint";
      double c3 = midpoint ? 0.5 * alpha_t * em1 : alpha_t * (em1 / h + 1.0);
      for (std::size_t i = 0; i < n; ++i) {
        double d1 = (1.0 / r0) * (m0[i] - m1[i]);
        out[i] = midpoint ? c1 * x[i] - c2 * m0[i] - c3 * d1 : c1 * x[i] - c2 * m0[i] + c3 * d1;
      }
      return out;
    }
    double lam_s2 = -std::log(sig[3]);
    const Vec& m2 = preds_[preds_.size() - 3];
    double h_1 = lam_s1 - lam_s2, r1 = h_1 / h;
    double c3 = alpha_t * (em1 / h + 1.0), c4 = alpha_t * ((em1 + h) / (h * h) - 0.5);
    for (std::size_t i = 0; i < n; ++i) {
      double d1_0 = (1.0 / r0) * (m0[i] - m1[i]), d1_1 = (1.0 / r1) * (m1[i] - m2[i]);
      double d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1);
      double d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1);
      out[i] = c1 * x[i] - c2 * m0[i] + c3 * d1 - c4 * d2;
    }
    return out;
  }
  std::vector<Vec> preds_;
};

// Solve A y = b (n <= 3) by Gaussian elimination with partial pivoting, as LAPACK's gesv.
Vec solve(std::vector<Vec> A, Vec b) {
  const std::size_t n = b.size();
  for (std::size_t col = 0; col < n; ++col) {
    std::size_t piv = col;
    for (std::size_t r = col + 1; r < n; ++r)
      if (std::fabs(A[r][col]) > std::fabs(A[piv][col])) piv = r;
    std::swap(A[col], A[piv]);
    std::swap(b[col], b[piv]);
    for (std::size_t r = col + 1; r < n; ++r) {
      double f = A[r][col] / A[col][col];
      for (std::size_t k = col; k < n; ++k) A[r][k] -= f * A[col][k];
      b[r] -= f * b[col];
    }
  }
  Vec y(n);
  for (std::size_t r = n; r-- > 0;) {
    double s = b[r];
    for (std::size_t k = r + 1; k < n; ++k) s -= A[r][k] * y[k];
    y[r] = s / A[r][r];
  }
  return y;
}

// ---- UniPC (Zhao et al. 2023, B(h) variants) ----
class UniPCRun : public VPSigmaRunT<UniPCRun> {
 public:
  using VPSigmaRunT::VPSigmaRunT;

  int order_at(int64_t g, int64_t k) const {
    const SchedulerConfig& c = config();
    int64_t cap = c.lower_order_final ? std::min<int64_t>(c.solver_order, static_cast<int64_t>(all_timesteps_.size()) - g)
                                      : c.solver_order;
    return static_cast<int>(std::min<int64_t>(cap, k + 1));
  }

 protected:
  bool multistep() const override { return true; }
  void reset_history() override {
    preds_.clear();
    last_sample_.clear();
    has_last_ = false;
    last_order_ = 0;
  }
  Vec do_step(const Vec& m, int64_t g, int64_t k, const Vec& x_in, const std::vector<int64_t>& shape, const Draw&,
              const Vec*) override {
    const SchedulerConfig& c = config();
    double alpha_s = vp(sigmas_[g]).first;
    Vec x0;
    x0_and_eps(c.prediction_type, m, x_in, alpha_s * alpha_s, &x0, nullptr);
    if (c.thresholding) dynamic_threshold(x0, shape, c.dynamic_thresholding_ratio, c.sample_max_value);
    Vec x = x_in;
    bool disabled = std::find(c.disable_corrector.begin(), c.disable_corrector.end(), g - 1) != c.disable_corrector.end();
    if (has_last_ && !disabled) x = update(last_sample_, g, g - 1, last_order_, &x0);
    preds_.push_back(x0);
    while (preds_.size() > static_cast<std::size_t>(c.solver_order)) preds_.erase(preds_.begin());
    int order = order_at(g, k);
    last_sample_ = x;
    has_last_ = true;
    last_order_ = order;
    return update(x, g + 1, g, order, nullptr);
  }

 private:
  Vec update(const Vec& x, int64_t t, int64_t s0, int order, const Vec* model_t) const {
    double sig_t = sigmas_[t], sig_s0 = sigmas_[s0];
    auto [alpha_t, sigma_t] = vp(sig_t);
    double sigma_s0 = vp(sig_s0).second;
    const Vec& m0 = preds_.back();
    double lam_t = -std::log(sig_t), lam_s0 = -std::log(sig_s0);
    double h = lam_t - lam_s0;
    Vec rks;
    for (int i = 1; i < order; ++i) rks.push_back((-std::log(sigmas_[s0 - i]) - lam_s0) / h);
    rks.push_back(1.0);
    double h_phi_1 = std::expm1(-h);
    const std::size_t n = x.size();
    double c1 = sigma_t / sigma_s0, c2 = alpha_t * h_phi_1;
    Vec x_t(n);
    for (std::size_t i = 0; i < n; ++i) x_t[i] = c1 * x[i] - c2 * m0[i];
    if (!model_t && order == 1) return x_t;
    double b_h = config().solver_type == "bh1" ? -h : h_phi_1;
    // bh_coefficients(rks, hh = -h, order, b_h)
    double hh = -h;
    double h_phi_k = std::expm1(hh) / hh - 1.0;
    std::vector<Vec> R;
    Vec b;
    double factorial = 1;
    for (int i = 1; i <= order; ++i) {
      Vec row;
      for (double r : rks) row.push_back(std::pow(r, static_cast<double>(i - 1)));
      R.push_back(row);
      b.push_back(h_phi_k * factorial / b_h);
      factorial *= i + 1;
      h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    Vec rhos;
    if (!model_t) {  // UniP
      if (order == 2) {
        rhos = {0.5};
      } else {
        std::vector<Vec> A;
        for (int r = 0; r < order - 1; ++r) A.emplace_back(R[r].begin(), R[r].begin() + (order - 1));
        rhos = solve(A, Vec(b.begin(), b.begin() + (order - 1)));
      }
    } else {
      rhos = order == 1 ? Vec{0.5} : solve(R, b);
    }
    double cres = alpha_t * b_h;
    Vec out(n);
    for (std::size_t i = 0; i < n; ++i) {
      double res = 0;  // Python's sum() starts from 0
      for (int k = 1; k < order; ++k) {
        if (!model_t && static_cast<std::size_t>(k - 1) >= rhos.size()) break;
        double d = (preds_[preds_.size() - 1 - k][i] - m0[i]) / rks[k - 1];
        res = res + rhos[k - 1] * d;
      }
      if (model_t) res = res + rhos.back() * ((*model_t)[i] - m0[i]);
      out[i] = x_t[i] - cres * res;
    }
    return out;
  }

  std::vector<Vec> preds_;
  Vec last_sample_;
  bool has_last_ = false;
  int last_order_ = 0;
};

// ---- LCM (Luo et al. 2023, Alg. 3: multistep consistency sampling) ----
constexpr double kSigmaData = 0.5;  // the data's standard deviation assumed by the boundary scalings

std::unique_ptr<SchedulerRun> make_lcm_run(std::shared_ptr<const Scheduler> s, const std::shared_ptr<const Scheduler::Kind>& kind,
                                           int64_t n, double strength);

class LCMRun : public RunBase<LCMRun> {
 public:
  using RunBase::RunBase;
  std::unique_ptr<SchedulerRun> with_strength(double strength) const override {
    // diffusers' LCM img2img rebuilds the schedule from the first int(original * strength) distillation steps
    // and runs all of its steps (lcm.py LCMRun.with_strength).
    if (!(strength > 0 && strength <= 1))
      throw SchedulerConfigError("strength must be in (0, 1], got " + py_float_repr(strength));
    return make_lcm_run(scheduler_, kind_, num_inference_steps_, strength);
  }

 protected:
  bool step_draws_noise(int64_t g) const override { return g != static_cast<int64_t>(all_timesteps_.size()) - 1; }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>& shape, const Draw& draw,
              const Vec*) override {
    double t = all_timesteps_[g];
    const bool last = g + 1 >= static_cast<int64_t>(all_timesteps_.size());
    double a_t = ac(t), a_prev = ac(last ? t : all_timesteps_[g + 1]);
    Vec x0;
    x0_and_eps(config().prediction_type, m, x, a_t, &x0, nullptr);
    clip_or_threshold(x0, shape, config());
    double sc = t * config().timestep_scaling;
    double c_skip = kSigmaData * kSigmaData / (sc * sc + kSigmaData * kSigmaData);
    double c_out = sc / std::sqrt(sc * sc + kSigmaData * kSigmaData);
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c_out * x0[i] + c_skip * x[i];
    if (last) return out;
    Vec z = draw();
    double sa = std::sqrt(a_prev), sb = std::sqrt(1 - a_prev);
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = sa * out[i] + sb * z[i];
    return out;
  }
};

// lcm.py consistency_timesteps (LCM, TCD): n timesteps evenly spread (by index) over the descending
// distillation schedule k - 1, 2k - 1, ... (k = T // original_inference_steps), its first
// int(original * strength) entries for img2img.
Vec consistency_timesteps(const Scheduler& s, int64_t n, double strength) {
  const SchedulerConfig& c = s.config();
  const std::string& name = s.name();
  const int64_t T = c.num_train_timesteps, orig = c.original_inference_steps;
  if (orig > T)
    throw SchedulerConfigError(name + ": original_inference_steps=" + std::to_string(orig) + " is more than num_train_timesteps=" +
                               std::to_string(T) + "; lower it");
  if (n > orig)
    throw SchedulerConfigError(name + ": " + std::to_string(n) + " steps is more than original_inference_steps=" + std::to_string(orig) +
                               ", the distillation schedule the steps are picked from; use at most " + std::to_string(orig) + " steps");
  const int64_t k = T / orig;
  const int64_t count = static_cast<int64_t>(static_cast<double>(orig) * strength);
  Vec origin;  // ascending
  for (int64_t i = 1; i <= count; ++i) origin.push_back(static_cast<double>(i * k - 1));
  if (static_cast<int64_t>(origin.size()) < n)
    throw SchedulerConfigError(name + ": strength " + py_float_repr(strength) + " keeps " + std::to_string(origin.size()) + " of the " +
                               std::to_string(orig) + " distillation timesteps, fewer than the " + std::to_string(n) +
                               " steps asked for; raise strength or lower the steps");
  // floor(linspace(0, len, n, endpoint=False)) indexes the descending schedule
  Vec ts;
  const double step = static_cast<double>(origin.size()) / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) {
    std::size_t idx = static_cast<std::size_t>(std::floor(static_cast<double>(i) * step));
    ts.push_back(origin[origin.size() - 1 - idx]);
  }
  double lo = *std::min_element(ts.begin(), ts.end()), hi = *std::max_element(ts.begin(), ts.end());
  if (hi > static_cast<double>(T - 1) || lo < 0)
    throw SchedulerConfigError(name + ": timesteps " + std::to_string(static_cast<int64_t>(lo)) + ".." +
                               std::to_string(static_cast<int64_t>(hi)) + " fall outside the training range 0.." +
                               std::to_string(T - 1) + "; lower steps_offset or num_inference_steps");
  return ts;
}

std::unique_ptr<SchedulerRun> make_lcm_run(std::shared_ptr<const Scheduler> s, const std::shared_ptr<const Scheduler::Kind>& kind,
                                           int64_t n, double strength) {
  Vec ts = consistency_timesteps(*s, n, strength);
  auto run = std::make_unique<LCMRun>(std::move(s), ts, n);
  run->set_kind(kind);
  return run;
}

// ---- TCD (Zheng et al. 2024, Alg. 4: strategic stochastic sampling) ----
class TCDRun : public RunBase<TCDRun> {
 public:
  using RunBase::RunBase;

 protected:
  // (t, t_next, s): this step's timestep, the next one (0 after the last) and s = floor((1 - gamma) t_next) in float32.
  std::tuple<double, double, double> steps(int64_t g) const {
    double t = all_timesteps_[g];
    double t_next = g + 1 < static_cast<int64_t>(all_timesteps_.size()) ? all_timesteps_[g + 1] : 0.0;
    float prod = static_cast<float>(1 - kind().eta) * static_cast<float>(t_next);
    return {t, t_next, std::floor(static_cast<double>(prod))};
  }
  bool last(int64_t g) const { return g == static_cast<int64_t>(all_timesteps_.size()) - 1; }
  bool step_draws_noise(int64_t g) const override { return kind().eta > 0 && !last(g); }
  Vec do_step(const Vec& m, int64_t g, int64_t, const Vec& x, const std::vector<int64_t>&, const Draw& draw, const Vec*) override {
    auto [t, t_next, s] = steps(g);
    double a_t = ac(t), a_next = ac(t_next), a_s = ac(s);
    Vec x0, eps;
    x0_and_eps(config().prediction_type, m, x, a_t, &x0, &eps);
    double c1 = std::sqrt(a_s), c2 = std::sqrt(1 - a_s);
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c1 * x0[i] + c2 * eps[i];
    if (kind().eta == 0 || last(g)) return out;
    Vec z = draw();
    double c3 = std::sqrt(a_next / a_s), c4 = std::sqrt(1 - a_next / a_s);
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c3 * out[i] + c4 * z[i];
    return out;
  }
};

// ---- DPM++ 2S ancestral (k-diffusion sample_dpmpp_2s_ancestral) ----
// (sigma_down, sigma_up) of k-diffusion's get_ancestral_step: sigma_up = eta sqrt(...) at most s_next.
std::pair<double, double> ancestral_split(double s, double s_next, double eta = 1.0) {
  double sigma_up = std::min(s_next, eta * std::sqrt(s_next * s_next * (s * s - s_next * s_next) / (s * s)));
  return {std::sqrt(s_next * s_next - sigma_up * sigma_up), sigma_up};
}

class DPM2SARun : public TwoStageRunT<DPM2SARun> {
 public:
  using TwoStageRunT::TwoStageRunT;

 protected:
  bool step_draws_noise(int64_t g) const override { return g % 2 == 1 && kind().eta > 0; }  // the midpoint call finishes a step
  Vec first(const Vec& m, int64_t g, const Vec& x, const Draw&, bool& needs_second) override {
    double sigma = sigmas_[g];
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, sigma);
    Vec out(x.size());
    double s_next = g + 2 < static_cast<int64_t>(sigmas_.size()) ? sigmas_[g + 2] : 0.0;
    auto [sigma_down, sigma_up] = ancestral_split(sigma, s_next, kind().eta);
    if (sigma_down == 0) {  // the last step: Euler to 0 lands on D(x; s_i)
      for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] + (x[i] - x0[i]) / sigma * (0.0 - sigma);
      return out;
    }
    double h = std::log(sigma / sigma_down);
    px_ = x;
    ph_ = h;
    pup_ = sigma_up;
    needs_second = true;
    double c1 = sigmas_[g + 1] / sigma, c2 = std::expm1(-h / 2);
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c1 * x[i] - c2 * x0[i];  // x at the midpoint
    return out;
  }
  Vec second(const Vec& m, int64_t g, const Vec& x, const Draw& draw) override {
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, sigmas_[g]);
    Vec out(x.size());
    double c1 = std::exp(-ph_), c2 = std::expm1(-ph_);
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = c1 * px_[i] - c2 * x0[i];
    if (pup_ > 0) {  // eta = 0 draws nothing
      Vec z = draw();
      for (std::size_t i = 0; i < x.size(); ++i) out[i] = out[i] + z[i] * pup_;
    }
    return out;
  }
  Vec px_;
  double ph_ = 0, pup_ = 0;
};

// ---- DPM++ SDE (diffusers' DPMSolverSDEScheduler; dpm_sde.py) ----
// Heun's sigma table [s0, s1, s1, ..., 0]; entry 2j at s_j, entry 2j + 1 at the log-midpoint m_j = sqrt(s_j s_{j+1}).
// Each call: x' = (sigma_down / s) x + (1 - sigma_down / s) D + sigma_up z (ancestral Euler), the last one Euler to 0.
class DPMSDERun : public TwoStageRunT<DPMSDERun> {
 public:
  DPMSDERun(std::shared_ptr<const Scheduler> s, Vec ts, int64_t n, Vec sigmas, Vec mids)
      : TwoStageRunT(std::move(s), std::move(ts), n, std::move(sigmas)), mids_(std::move(mids)) {}

 protected:
  bool step_draws_noise(int64_t g) const override { return sigmas_[g + 1] > 0; }  // all but the last (Euler) call
  double model_sigma(int64_t g) const override { return g % 2 == 0 ? sigmas_[g] : mids_[g / 2]; }  // midpoints: m_j
  static Vec ancestral(const Vec& x, const Vec& x0, double s, double s_to, const Draw& draw) {
    auto [sigma_down, sigma_up] = ancestral_split(s, s_to);
    double r = sigma_down / s;
    Vec z = draw();
    Vec out(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) out[i] = r * x[i] + (1.0 - r) * x0[i] + z[i] * sigma_up;
    return out;
  }
  Vec first(const Vec& m, int64_t g, const Vec& x, const Draw& draw, bool& needs_second) override {
    double sigma = sigmas_[g];
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, sigma);
    if (sigmas_[g + 1] == 0) {  // the last step: Euler to 0 lands on D(x; s_{n-1})
      Vec out(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] + (x[i] - x0[i]) / sigma * (0.0 - sigma);
      return out;
    }
    px_ = x;
    needs_second = true;
    return ancestral(x, x0, sigma, mids_[g / 2], draw);  // to the midpoint
  }
  Vec second(const Vec& m, int64_t g, const Vec& x, const Draw& draw) override {
    Vec x0 = x0_from_sigma(config().prediction_type, m, x, mids_[g / 2]);  // D(x_mid; m_j)
    return ancestral(px_, x0, sigmas_[g - 1], sigmas_[g], draw);
  }
  Vec mids_;
  Vec px_;
};

}  // namespace

std::unique_ptr<SchedulerRun> Scheduler::set_timesteps(int64_t n) const {
  const SchedulerConfig& c = config_;
  const int64_t T = c.num_train_timesteps;
  if (n < 1 || n > T)
    throw SchedulerConfigError("num_inference_steps must be in [1, " + std::to_string(T) + "] (num_train_timesteps), got " +
                               std::to_string(n));
  auto self = shared_from_this();
  const auto& ac = alphas_cumprod_;
  auto finish = [&](auto run) -> std::unique_ptr<SchedulerRun> {
    run->set_kind(kind_);
    return run;
  };
  switch (kind_->cls) {
    case Cls::LCM: return make_lcm_run(self, kind_, n, 1.0);
    case Cls::DPM2SA: {
      auto [steps_t, steps_s] = interpolated_sigmas(c, ac, n);
      steps_s.push_back(0.0);
      steps_s = to_f32_table(steps_s);
      Vec mids;  // midpoint sigma of every two-call step
      for (int64_t i = 0; i + 1 < n; ++i)
        mids.push_back(std::sqrt(steps_s[i] * ancestral_split(steps_s[i], steps_s[i + 1], kind_->eta).first));
      mids = to_f32_table(mids);
      Vec mid_t = sigma_to_t(mids, log_f32(train_sigmas(ac)), true);
      Vec ts, sig;
      for (int64_t i = 0; i < n; ++i) {
        ts.push_back(steps_t[i]);
        sig.push_back(steps_s[i]);
        if (i + 1 < n) {
          ts.push_back(static_cast<double>(f32(mid_t[i])));
          sig.push_back(mids[i]);
        }
      }
      sig.push_back(0.0);
      return finish(std::make_unique<DPM2SARun>(self, ts, n, sig));
    }
    case Cls::TCD: return finish(std::make_unique<TCDRun>(self, consistency_timesteps(*this, n, 1.0), n));
    case Cls::DDIM: {
      auto run = std::make_unique<DDIMRun>(self, spaced_timesteps(c, n, true), n);
      run->set_kind(kind_);
      Vec ts = run->timesteps();
      if (!ts.empty()) {
        double lo = *std::min_element(ts.begin(), ts.end()), hi = *std::max_element(ts.begin(), ts.end());
        if (hi > static_cast<double>(T - 1) || lo < 0)
          throw SchedulerConfigError(name_ + ": timesteps " + std::to_string(static_cast<int64_t>(lo)) + ".." +
                                     std::to_string(static_cast<int64_t>(hi)) + " fall outside the training range 0.." +
                                     std::to_string(T - 1) + "; lower steps_offset or num_inference_steps");
      }
      return run;
    }
    case Cls::DDPM: {
      Vec ts = spaced_timesteps(c, n, true);
      double lo = *std::min_element(ts.begin(), ts.end()), hi = *std::max_element(ts.begin(), ts.end());
      if (hi > static_cast<double>(T - 1) || lo < 0)
        throw SchedulerConfigError(name_ + ": timesteps " + std::to_string(static_cast<int64_t>(lo)) + ".." +
                                   std::to_string(static_cast<int64_t>(hi)) + " fall outside the training range 0.." +
                                   std::to_string(T - 1) + "; lower steps_offset or num_inference_steps");
      return finish(std::make_unique<DDPMRun>(self, ts, n));
    }
    case Cls::Euler: {
      auto [t, s] = discrete_sigmas(c, ac, n, true);
      double last = c.final_sigmas_type == "sigma_min" ? static_cast<double>(train_sigmas(ac)[0]) : 0.0;
      s.push_back(last);
      return finish(std::make_unique<EulerRun>(self, t, n, to_f32_table(s)));
    }
    case Cls::EulerA: {
      auto [t, s] = interpolated_sigmas(c, ac, n);
      s.push_back(0.0);
      return finish(std::make_unique<EulerARun>(self, t, n, to_f32_table(s)));
    }
    case Cls::LMS: {
      auto [t, s] = discrete_sigmas(c, ac, n, false);
      s.push_back(0.0);
      return finish(std::make_unique<LMSRun>(self, t, n, to_f32_table(s)));
    }
    case Cls::Heun: {
      auto [t, s] = discrete_sigmas(c, ac, n, false);
      s.push_back(0.0);
      s = to_f32_table(s);
      Vec sig = heun_sigma_table(s);
      Vec ts = {t[0]};
      for (std::size_t i = 1; i < t.size(); ++i) {
        ts.push_back(t[i]);
        ts.push_back(t[i]);
      }
      return finish(std::make_unique<HeunRun>(self, ts, n, sig));
    }
    case Cls::DPMSDE: {
      auto [t, s] = discrete_sigmas(c, ac, n, false);  // float64, without the tail
      Vec mids;  // float64 log-midpoints sqrt(s_j s_{j+1}), whose timesteps diffusers reads back
      for (std::size_t i = 0; i + 1 < s.size(); ++i) mids.push_back(std::sqrt(s[i] * s[i + 1]));
      Vec log_table;  // float64 log of the float32 training sigmas (dpm_sde.py: no float32 log's ulp errors)
      for (float v : train_sigmas(ac)) log_table.push_back(std::log(static_cast<double>(v)));
      Vec mid_t = sigma_to_t(mids, log_table);
      Vec ts;
      for (std::size_t i = 0; i < t.size(); ++i) {
        ts.push_back(static_cast<double>(f32(t[i])));
        if (i + 1 < t.size()) ts.push_back(static_cast<double>(f32(mid_t[i])));
      }
      s.push_back(0.0);
      s = to_f32_table(s);
      Vec sig = heun_sigma_table(s);
      Vec mids32;  // the midpoints as the model sees them: float32 of sqrt of the float32 table's neighbours
      for (std::size_t i = 0; i + 2 < s.size(); ++i) mids32.push_back(static_cast<double>(f32(std::sqrt(s[i] * s[i + 1]))));
      return finish(std::make_unique<DPMSDERun>(self, ts, n, sig, mids32));
    }
    case Cls::DPM: {
      std::vector<float> st = train_sigmas(ac);
      // timesteps on [0, last_timestep), dropping those whose lambda is below lambda_min_clipped
      int64_t clipped = 0;  // searchsorted(lambdas ascending, lambda_min_clipped): how many are below it
      for (std::size_t i = 0; i < ac.size(); ++i) {
        float lam = std::log(std::sqrt(ac[i])) - std::log(std::sqrt(1.0f - ac[i]));
        if (static_cast<double>(lam) < c.lambda_min_clipped) ++clipped;
      }
      Vec ts = multistep_timesteps(c, n, T - clipped);
      Vec s;
      if (c.use_karras_sigmas) {
        double smin = c.sigma_min ? *c.sigma_min : static_cast<double>(st[0]);
        double smax = c.sigma_max ? *c.sigma_max : static_cast<double>(st.back());
        s = karras_sigmas(smin, smax, n);
        Vec t = sigma_to_t(s, log_f32(st));
        ts.clear();
        // diffusers rounds except for the cosine schedule, where the int cast truncates.
        for (double v : t) ts.push_back(static_cast<double>(static_cast<int64_t>(c.beta_schedule == "squaredcos_cap_v2" ? v : rint_even(v))));
      } else {
        for (double v : ts) s.push_back(interp_index(v, st));
      }
      s.push_back(c.final_sigmas_type == "sigma_min" ? static_cast<double>(st[0]) : 0.0);
      return finish(std::make_unique<DPMRun>(self, ts, n, to_f32_table(s)));
    }
    case Cls::UniPC: {
      std::vector<float> st = train_sigmas(ac);
      Vec ts = multistep_timesteps(c, n, T);
      Vec s;
      double last;
      if (c.use_karras_sigmas) {
        double smin = c.sigma_min ? *c.sigma_min : static_cast<double>(st[0]);
        double smax = c.sigma_max ? *c.sigma_max : static_cast<double>(st.back());
        s = karras_sigmas(smin, smax, n);
        Vec t = sigma_to_t(s, log_f32(st));
        ts.clear();
        for (double v : t) ts.push_back(static_cast<double>(static_cast<int64_t>(rint_even(v))));
        last = s.back();
      } else {
        for (double v : ts) s.push_back(interp_index(v, st));
        last = static_cast<double>(st[0]);
      }
      if (c.final_sigmas_type == "zero") last = 0.0;
      s.push_back(last);
      return finish(std::make_unique<UniPCRun>(self, ts, n, to_f32_table(s)));
    }
    case Cls::PNDM: {
      if (!c.skip_prk_steps && n < kPndmOrder)
        throw SchedulerConfigError("pndm with skip_prk_steps=false needs num_inference_steps >= " + std::to_string(kPndmOrder) +
                                   ", got " + std::to_string(n) + "; set skip_prk_steps=true (PLMS only, as Stable Diffusion does)");
      Vec desc = spaced_timesteps(c, n, true);
      Vec asc(desc.rbegin(), desc.rend());
      double lo = asc.front(), hi = asc.back();
      for (double v : asc) lo = std::min(lo, v), hi = std::max(hi, v);
      if (hi > static_cast<double>(T - 1) || lo < 0)
        throw SchedulerConfigError(name_ + ": timesteps " + std::to_string(static_cast<int64_t>(lo)) + ".." +
                                   std::to_string(static_cast<int64_t>(hi)) + " fall outside the training range 0.." +
                                   std::to_string(T - 1) + "; lower steps_offset or num_inference_steps");
      Vec prk, plms;
      if (c.skip_prk_steps) {
        // PLMS repeats the second timestep: concat(asc[:-1], asc[-2:-1], asc[-1:]) reversed
        Vec cat(asc.begin(), asc.end() - 1);
        if (asc.size() >= 2) cat.push_back(asc[asc.size() - 2]);
        cat.push_back(asc.back());
        plms.assign(cat.rbegin(), cat.rend());
      } else {
        int64_t half = T / n / 2;
        Vec p;  // asc[-4:].repeat(2) + tile([0, half], 4)
        for (std::size_t i = asc.size() - kPndmOrder; i < asc.size(); ++i) {
          p.push_back(asc[i]);
          p.push_back(asc[i] + static_cast<double>(half));
        }
        p.pop_back();  // [:-1]
        Vec r;         // .repeat(2)[1:-1]
        for (double v : p) r.push_back(v), r.push_back(v);
        Vec mid(r.begin() + 1, r.end() - 1);
        prk.assign(mid.rbegin(), mid.rend());
        Vec head(asc.begin(), asc.end() - 3);
        plms.assign(head.rbegin(), head.rend());
      }
      Vec all = prk;
      all.insert(all.end(), plms.begin(), plms.end());
      return finish(std::make_unique<PNDMRun>(self, all, n, prk));
    }
  }
  throw SchedulerConfigError("unknown scheduler class");
}

Tensor guidance_embedding(double guidance, int64_t dim, int64_t rows) {
  if (dim < 1 || rows < 0) throw std::invalid_argument("guidance_embedding needs dim >= 1 and rows >= 0");
  const int64_t half = dim / 2;
  const float w = static_cast<float>(guidance - 1.0) * 1000.0f;
  const float step = half > 1 ? std::log(10000.0f) / static_cast<float>(half - 1) : 0.0f;
  std::vector<float> emb(static_cast<std::size_t>(dim), 0.0f);  // [sin(args), cos(args)] (+ a zero pad if dim is odd)
  for (int64_t k = 0; k < half; ++k) {
    float freq = std::exp(static_cast<float>(k) * -step);
    float arg = w * freq;
    emb[static_cast<std::size_t>(k)] = std::sin(arg);
    emb[static_cast<std::size_t>(half + k)] = std::cos(arg);
  }
  Tensor out({rows, dim});
  for (int64_t r = 0; r < rows; ++r) std::copy(emb.begin(), emb.end(), out.data.begin() + r * dim);
  return out;
}

}  // namespace ldm_rt::native
