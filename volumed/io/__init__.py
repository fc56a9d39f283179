"""volumed.io"""
