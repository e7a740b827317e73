/* Learning-rate schedules: warmup-stable-decay (WSD, MiniCPM / Hägele et al.), cosine and constant,
 * each with a linear warmup from 0. Position and lengths share one unit chosen by the caller (steps
 * or tokens), and the schedule is a pure function of the position, so a stage resumed mid-way gets
 * exactly the rate it would have had. The parse helpers turn config strings into the enums and
 * return -1 for an unknown name; the config layer turns that into a user error. */
#pragma once

typedef enum { SCHEDULE_WSD, SCHEDULE_COSINE, SCHEDULE_CONSTANT } ScheduleKind;

// Shape of the WSD decay as a function of p, the fraction of the decay elapsed (floor f):
// linear f + (1-f)(1-p); cosine f + (1-f)(1+cos(pi p))/2; 1-sqrt f + (1-f)(1-sqrt(p)).
typedef enum { DECAY_LINEAR, DECAY_COSINE, DECAY_ONE_MINUS_SQRT } DecayShape;

typedef struct {
  ScheduleKind kind;
  double peak_lr;
  double warmup;             // length of the linear warmup from 0 to peak_lr (0: none)
  double total;              // the schedule ends here; past it the rate stays at the floor
  double decay_fraction;     // WSD: the decay takes the final decay_fraction of total
  DecayShape decay_shape;    // WSD only
  double min_lr_fraction;    // the floor, as a fraction of peak_lr (WSD and cosine)
} Schedule;

// The learning rate at `position` (same unit as warmup and total).
// WSD: warmup, then peak until total * (1 - decay_fraction), then the decay shape down to the floor
// at total. Cosine: from the end of warmup, (1 + cos) / 2 down to the floor at total. Constant:
// peak after warmup. Where a WSD decay overlaps the warmup the two factors multiply.
double schedule_lr(const Schedule *schedule, double position);

// NULL if the schedule is usable, else a phrase naming the bad field for the config error message.
const char *schedule_problem(const Schedule *schedule);

// "wsd" | "cosine" | "constant" -> ScheduleKind; -1 if unknown.
int schedule_parse_kind(const char *name);
// "linear" | "cosine" | "1-sqrt" -> DecayShape; -1 if unknown.
int schedule_parse_decay_shape(const char *name);
// The names the parsers accept, for printing a config back.
const char *schedule_kind_name(ScheduleKind kind);
const char *schedule_decay_shape_name(DecayShape shape);
