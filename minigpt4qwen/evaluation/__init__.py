"""`minigpt4qwen eval`: the standard multimodal benchmarks, read in their released layouts and scored as their
own scripts score them.

One module per benchmark reads its data into `Question`s and scores raw answers (mme, mmbench, pope, seed,
vqa, caption; choice holds the multiple-choice answer extraction MMBench and SEED-Bench share); `benchmarks`
names them; `answering` turns prompts into answers in batches; `runner` writes the predictions as they come and
resumes; `report` builds the results table and JSON and compares two results files.
"""
