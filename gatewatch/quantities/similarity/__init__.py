"""Expert similarity: linear CKA and the cosine of mean outputs between the experts of each gate."""
