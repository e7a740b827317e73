#include "optim/schedule.h"

#include <math.h>
#include <string.h>

#include "common/check.h"

static const double PI = 3.14159265358979323846;

static double clamp01(double x) { return x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x); }

// From 1 at p = 0 to 0 at p = 1.
static double decay_shape_value(DecayShape shape, double p) {
  switch (shape) {
    case DECAY_LINEAR: return 1.0 - p;
    case DECAY_COSINE: return 0.5 * (1.0 + cos(PI * p));
    case DECAY_ONE_MINUS_SQRT: return 1.0 - sqrt(p);
  }
  CHECK(0, "unknown decay shape %d", (int)shape);
  return 0.0;
}

double schedule_lr(const Schedule *s, double position) {
  double warmup_factor = s->warmup > 0.0 ? clamp01(position / s->warmup) : 1.0;
  double floor = s->min_lr_fraction;
  double decay_factor = 1.0;
  switch (s->kind) {
    case SCHEDULE_CONSTANT: break;
    case SCHEDULE_WSD: {
      double decay_length = s->total * s->decay_fraction;
      double decay_start = s->total - decay_length;
      if (position >= decay_start) {
        double p = decay_length > 0.0 ? clamp01((position - decay_start) / decay_length) : 1.0;
        decay_factor = floor + (1.0 - floor) * decay_shape_value(s->decay_shape, p);
      }
      break;
    }
    case SCHEDULE_COSINE: {
      double length = s->total - s->warmup;
      double p = length > 0.0 ? clamp01((position - s->warmup) / length) : 1.0;
      decay_factor = floor + (1.0 - floor) * decay_shape_value(DECAY_COSINE, p);
      break;
    }
    default: CHECK(0, "unknown schedule kind %d", (int)s->kind);
  }
  return s->peak_lr * warmup_factor * decay_factor;
}

const char *schedule_problem(const Schedule *s) {
  if (!(s->peak_lr >= 0.0)) return "the peak learning rate must be >= 0";
  if (!(s->warmup >= 0.0)) return "the warmup length must be >= 0";
  if (s->kind != SCHEDULE_CONSTANT && !(s->total > 0.0)) return "the schedule length must be > 0";
  if (s->kind == SCHEDULE_COSINE && !(s->warmup <= s->total))
    return "the warmup must not be longer than the whole schedule";
  if (s->kind == SCHEDULE_WSD && !(s->decay_fraction >= 0.0 && s->decay_fraction <= 1.0))
    return "the decay fraction must be between 0 and 1";
  if (!(s->min_lr_fraction >= 0.0 && s->min_lr_fraction <= 1.0))
    return "the minimum learning rate fraction must be between 0 and 1";
  return NULL;
}

static const char *const KIND_NAMES[] = {[SCHEDULE_WSD] = "wsd", [SCHEDULE_COSINE] = "cosine",
                                         [SCHEDULE_CONSTANT] = "constant"};
static const char *const SHAPE_NAMES[] = {[DECAY_LINEAR] = "linear", [DECAY_COSINE] = "cosine",
                                          [DECAY_ONE_MINUS_SQRT] = "1-sqrt"};

static int find_name(const char *const *names, int count, const char *name) {
  if (!name) return -1;
  for (int i = 0; i < count; i++)
    if (strcmp(names[i], name) == 0) return i;
  return -1;
}

int schedule_parse_kind(const char *name) { return find_name(KIND_NAMES, 3, name); }
int schedule_parse_decay_shape(const char *name) { return find_name(SHAPE_NAMES, 3, name); }

const char *schedule_kind_name(ScheduleKind kind) {
  CHECK((int)kind >= 0 && (int)kind < 3, "unknown schedule kind %d", (int)kind);
  return KIND_NAMES[kind];
}
const char *schedule_decay_shape_name(DecayShape shape) {
  CHECK((int)shape >= 0 && (int)shape < 3, "unknown decay shape %d", (int)shape);
  return SHAPE_NAMES[shape];
}
