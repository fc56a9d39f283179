"""volumed.heads"""
