"""Data: tokenizer, transforms, synthetic captioned images, WebDataset shard writing and loading."""
