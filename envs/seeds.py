"""The seed blocks every evaluation in the project keeps apart (training, its evaluation, tuning,
final test reports); disjoint by construction. No Gymnasium here: the base install's commands
(`tune`, `plan`, `league`) use them too."""

TRAIN_SEED_BASE, TRAIN_SEED_COUNT = 0, 100_000
EVAL_SEED_BASE = 100_000  # evaluation during training (EvalCallback)
TUNE_SEED_BASE = 150_000  # tuning objectives (tune-rl, per-cell tuned baselines, plan's search)
TEST_SEED_BASE = 200_000  # final reports (agentsched evaluate, tune-rl's test report, plan's verification)
