// Learning-rate schedules at their landmarks (warmup end, decay start, mid-decay, end, past the end)
// for WSD with each decay shape, cosine and constant; the same schedule in tokens instead of steps;
// the name parsers and the problem check.
#include <criterion/criterion.h>

#include "optim/schedule.h"
#include "tests/testing.h"

static Schedule wsd(DecayShape shape) {
  return (Schedule){.kind = SCHEDULE_WSD, .peak_lr = 1e-3, .warmup = 100, .total = 1000,
                    .decay_fraction = 0.2, .decay_shape = shape, .min_lr_fraction = 0.1};
}

Test(schedule, wsd_landmarks_for_every_shape) {
  const double half_decay[3] = {[DECAY_LINEAR] = 0.5, [DECAY_COSINE] = 0.5,
                                [DECAY_ONE_MINUS_SQRT] = 1 - 0.70710678118654752};
  const double quarter_decay[3] = {[DECAY_LINEAR] = 0.75, [DECAY_COSINE] = 0.85355339059327376,
                                   [DECAY_ONE_MINUS_SQRT] = 0.5};
  for (int shape = 0; shape < 3; shape++) {
    Schedule s = wsd((DecayShape)shape);
    cr_assert_eq(schedule_lr(&s, 0), 0.0, "warmup starts from 0");
    cr_assert_float_eq(schedule_lr(&s, 25), 0.25e-3, 1e-18);
    cr_assert_float_eq(schedule_lr(&s, 100), 1e-3, 1e-18, "warmup end");
    cr_assert_float_eq(schedule_lr(&s, 450), 1e-3, 1e-18, "stable phase");
    cr_assert_float_eq(schedule_lr(&s, 800), 1e-3, 1e-18, "decay start");
    cr_assert_float_eq(schedule_lr(&s, 850), 1e-3 * (0.1 + 0.9 * quarter_decay[shape]), 1e-15, "shape %d", shape);
    cr_assert_float_eq(schedule_lr(&s, 900), 1e-3 * (0.1 + 0.9 * half_decay[shape]), 1e-15, "shape %d", shape);
    cr_assert_float_eq(schedule_lr(&s, 1000), 1e-4, 1e-18, "end at the floor");
    cr_assert_float_eq(schedule_lr(&s, 5000), 1e-4, 1e-18, "past the end stays at the floor");
    double previous = schedule_lr(&s, 100);
    for (double p = 100; p <= 1100; p += 0.5) {
      double lr = schedule_lr(&s, p);
      cr_assert_leq(lr, previous, "shape %d increases at %g", shape, p);
      previous = lr;
    }
  }
}

Test(schedule, cosine_and_constant) {
  Schedule cosine = {.kind = SCHEDULE_COSINE, .peak_lr = 2.0, .warmup = 10, .total = 110, .min_lr_fraction = 0.25};
  cr_assert_float_eq(schedule_lr(&cosine, 5), 1.0, 1e-15);
  cr_assert_float_eq(schedule_lr(&cosine, 10), 2.0, 1e-15, "warmup end is the peak");
  cr_assert_float_eq(schedule_lr(&cosine, 35), 2.0 * (0.25 + 0.75 * 0.85355339059327376), 1e-14);
  cr_assert_float_eq(schedule_lr(&cosine, 60), 2.0 * (0.25 + 0.75 * 0.5), 1e-14, "half way");
  cr_assert_float_eq(schedule_lr(&cosine, 110), 0.5, 1e-15, "end at the floor");
  cr_assert_float_eq(schedule_lr(&cosine, 1e6), 0.5, 1e-15);

  Schedule constant = {.kind = SCHEDULE_CONSTANT, .peak_lr = 3.0, .warmup = 4};
  cr_assert_eq(schedule_lr(&constant, 0), 0.0);
  cr_assert_float_eq(schedule_lr(&constant, 1), 0.75, 1e-15);
  cr_assert_eq(schedule_lr(&constant, 4), 3.0);
  cr_assert_eq(schedule_lr(&constant, 1e12), 3.0);

  Schedule no_warmup = wsd(DECAY_LINEAR);
  no_warmup.warmup = 0;
  cr_assert_eq(schedule_lr(&no_warmup, 0), 1e-3, "no warmup starts at the peak");
}

// A stage measured in tokens (4096 per step) gives the rate of the same stage measured in steps,
// at fractional positions too, so resuming from a token count lands on the same curve.
Test(schedule, tokens_and_steps_agree) {
  for (int shape = 0; shape < 3; shape++) {
    Schedule steps = wsd((DecayShape)shape), tokens = steps;
    tokens.warmup *= 4096;
    tokens.total *= 4096;
    for (double p = 0; p <= 1000; p += 12.375)
      cr_assert_float_eq(schedule_lr(&tokens, p * 4096), schedule_lr(&steps, p), 1e-15, "position %g", p);
  }
}

Test(schedule, names_parse_and_print) {
  cr_assert_eq(schedule_parse_kind("wsd"), SCHEDULE_WSD);
  cr_assert_eq(schedule_parse_kind("cosine"), SCHEDULE_COSINE);
  cr_assert_eq(schedule_parse_kind("constant"), SCHEDULE_CONSTANT);
  cr_assert_eq(schedule_parse_kind("WSD"), -1);
  cr_assert_eq(schedule_parse_kind("linear"), -1);
  cr_assert_eq(schedule_parse_kind(NULL), -1);
  cr_assert_eq(schedule_parse_decay_shape("linear"), DECAY_LINEAR);
  cr_assert_eq(schedule_parse_decay_shape("cosine"), DECAY_COSINE);
  cr_assert_eq(schedule_parse_decay_shape("1-sqrt"), DECAY_ONE_MINUS_SQRT);
  cr_assert_eq(schedule_parse_decay_shape("sqrt"), -1);
  cr_assert_eq(schedule_parse_decay_shape(""), -1);
  for (int k = 0; k < 3; k++) cr_assert_eq(schedule_parse_kind(schedule_kind_name((ScheduleKind)k)), k);
  for (int d = 0; d < 3; d++) cr_assert_eq(schedule_parse_decay_shape(schedule_decay_shape_name((DecayShape)d)), d);
}

Test(schedule, problems_are_named) {
  Schedule good = wsd(DECAY_ONE_MINUS_SQRT);
  cr_assert_null(schedule_problem(&good));
  Schedule bad = good;
  bad.decay_fraction = 1.5;
  cr_assert_not_null(schedule_problem(&bad));
  bad = good;
  bad.min_lr_fraction = -0.1;
  cr_assert_not_null(schedule_problem(&bad));
  bad = good;
  bad.total = 0;
  cr_assert_not_null(schedule_problem(&bad));
  bad = good;
  bad.kind = SCHEDULE_COSINE;
  bad.warmup = 2000;
  cr_assert_not_null(schedule_problem(&bad));
  bad = good;
  bad.peak_lr = NAN;
  cr_assert_not_null(schedule_problem(&bad));
}
