"""volumed.inference"""
