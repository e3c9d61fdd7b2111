# %% [markdown]
# # A study's results in Python
#
# `chae_ablate.load` reads a study file and its results (the MLflow store of the folder it was
# run in); nothing is trained. Run it after `chae-ablate run studies/quickstart.yaml`:
#
#     python examples/from_python.py [STUDY.yaml] [FOLDER]
#
# The `# %%` lines make this file a notebook in VS Code, PyCharm and Jupytext.

# %%
import sys

import chae_ablate

study_file = sys.argv[1] if len(sys.argv) > 1 else "studies/quickstart.yaml"
folder = sys.argv[2] if len(sys.argv) > 2 else "."
study = chae_ablate.load(study_file, folder=folder)

# %% The plan: every variant's size and cost, without training
print(study.plan()[["variant", "params", "mflops", "tokens"]].to_string(index=False))

# %% The verdicts: one row per variant, as summary.csv
verdicts = study.verdicts()
print(verdicts[["variant", "n_pairs", "diff", "diff_low", "diff_high", "verdict"]].to_string(index=False))

# %% One row per cell of this version of the study, as results.csv
results = study.results()
print(results.groupby("variant")["best_val_loss"].agg(["count", "mean", "std"]))

# %% Per-epoch curves, long: one row per cell and epoch
curves = study.curves()
last = curves.sort_values("epoch").groupby("variant")["val_loss"].last()
print(last.rename("last epoch's val_loss (last seed)"))

# %% The report's figures as matplotlib Figures; in a notebook, the last line shows it
figures = study.figures()
figures["differences"].savefig("differences.png", dpi=100)
print(f"{len(figures)} figures: {', '.join(figures)}; differences.png written")
figures["differences"]
