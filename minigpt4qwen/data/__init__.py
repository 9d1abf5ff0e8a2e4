"""Training data: annotation formats, image transforms, tokenized and masked samples, batching and sampling.

`config` (DataConfig), `formats` (readers -> Conversation), `images` (transforms), `dataset` (ConversationDataset),
`collate` (DataCollator), `sampler` (ShardedSampler) and `check` (check_dataset, the validation pass).
"""
